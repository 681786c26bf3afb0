/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The few kernel types bpf/sockmap_identity.bpf.c, bpf/sockmap_holders.bpf.c and
 * bpf/sockmap_events.bpf.c read, declared for CO-RE instead of a
 * generated vmlinux.h, so the product builds on a machine without /sys/kernel/btf/vmlinux
 * (a Debian build host). Only the fields read are declared; every struct but the
 * iterators' contexts carries preserve_access_index, so libbpf relocates each field offset at load time against the
 * running kernel's BTF, matching fields by name (also through the kernel's anonymous unions:
 * skc_addrpair, skc_portpair, ...). Layouts here need not match any kernel.
 */
#ifndef SOCKMAP_GC_VMLINUX_MIN_H
#define SOCKMAP_GC_VMLINUX_MIN_H

#include <linux/types.h>

struct seq_file;
struct sock;
struct task_struct;
struct file;

/* The iterators' contexts, without preserve_access_index: their layouts are fixed (the
 * verifier checks a context's offsets), and each relocated type costs a search of the
 * kernel's BTF at every load (about a millisecond). Pointers are 8 bytes on the BPF target,
 * as the kernel's __bpf_md_ptr makes them. */
struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

/* net/core/sock_map.c: the context of an iter/sockmap program. */
struct bpf_iter__sockmap {
	struct bpf_iter_meta *meta;
	void *map;
	void *key;
	struct sock *sk;
};

/* kernel/bpf/task_iter.c: the context of an iter/task_file program. */
struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct bpf_map {
	__u32 key_size;
	__u32 id;
};

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
};

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct inode {
	unsigned short i_mode;
	unsigned long i_ino;
};

struct file {
	struct inode *f_inode;
};

struct socket {
	struct file *file;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	/* Moved here from struct sock's sk_flags in recent kernels (6.18 has it here). */
	unsigned long skc_flags;
};

struct sock {
	struct sock_common __sk_common;
	/* NULL when no struct socket (and so no file) refers to the sock. */
	struct socket *sk_socket;
	int sk_err;
	/* A psock (the socket is in a sockmap or sockhash) sets the SK_USER_DATA_NOCOPY bit. */
	void *sk_user_data;
	/* Since 6.17 ("net: lockless sock_i_ino()"): SOCK_INODE(sk_socket)->i_ino, cached. */
	unsigned long sk_ino;
	/* Before skc_flags: the flags were struct sock's own. A field of struct sock, not of a
	 * flavour type, so that libbpf searches the kernel's BTF for one type less. */
	unsigned long sk_flags;
};

struct task_struct {
	int tgid;
	char comm[16];
};

/* kernel/bpf/task_iter.c: the context of an iter/task_file program. */

/* inet_sport keeps the local port after the kernel zeroes skc_num on unhash (TCP_CLOSE).
 * A program reaches it through bpf_skc_to_tcp_sock: the verifier allows no read past
 * struct sock through a plain cast. */
struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
};

struct inet_connection_sock {
	struct inet_sock icsk_inet;
};

struct tcp_sock {
	struct inet_connection_sock inet_conn;
};

#pragma clang attribute pop

#endif
