// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Names the processes holding sockets: one iter/task_file program that walks every open
 * file of every process in the reader's pid namespace and emits one struct holder_rec per
 * socket file (S_IFSOCK inode), so a stale sockhash entry's socket inode can be traced to
 * the process (tgid, fd, comm) that keeps it open. No ptrace rights over those processes
 * are needed, where a /proc/PID/fd scan needs them.
 *
 * Only direct BTF reads: it loads under lockdown's confidentiality mode. The kernel's
 * task_file iterator already skips threads that share their leader's file table, so each
 * fd of a process is seen once.
 *
 * The record layout is mirrored in src/holder/scan.rs; both sides assert the size.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "vmlinux_min.h"

#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define TASK_COMM_LEN 16

struct holder_rec {
	__u64 inode;                /* 0: the socket file's inode (fstat's st_ino) */
	__u32 tgid;                 /* 8: the process id (the reader's pid namespace's view) */
	__u32 fd;                   /* 12 */
	char comm[TASK_COMM_LEN];   /* 16: the task's comm, NUL-padded */
};
_Static_assert(sizeof(struct holder_rec) == 32, "holder_rec layout is shared with Rust");

SEC("iter/task_file")
int holders(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct holder_rec rec;
	struct inode *inode;

	if (!task || !file)
		return 0;
	inode = file->f_inode;
	if (!inode || (inode->i_mode & S_IFMT) != S_IFSOCK)
		return 0;
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.inode = inode->i_ino;
	rec.tgid = task->tgid;
	rec.fd = ctx->fd;
	__builtin_memcpy(rec.comm, task->comm, TASK_COMM_LEN);
	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
