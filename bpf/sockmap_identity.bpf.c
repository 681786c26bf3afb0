// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Sees the socket behind every entry of a sockhash with 44-byte keys (Cilium's
 * cilium_sock_ops), and deletes an entry only while it still holds a given socket.
 *
 * Two iter/sockmap programs; userspace attaches them to the map at run time:
 *  - identity: one struct identity_rec per entry: the raw key and, for the socket it holds,
 *    the cookie, family, own local and remote end, TCP state, network namespace inode, and
 *    what says who keeps it: the inode of the file that refers to it (0 when none does: a
 *    connection in a listener's accept queue, or an orphan), whether it is orphaned
 *    (SOCK_DEAD), and its last error (sk_err: ECONNRESET after a reset). With `ends_only`
 *    set, the cookie, family, ends and state alone (the continuous pass).
 *    Only direct BTF reads and bpf_get_socket_cookie: no fentry, no bpf_probe_read_kernel,
 *    so it loads under lockdown's confidentiality mode.
 *  - compare_and_delete: for each entry whose key is in `targets`, re-checks the verdict and
 *    deletes the entry from `held` (userspace makes `held` the iterated map with
 *    bpf_map__reuse_fd before load) only if it still holds the judged socket (same cookie;
 *    with CAD_ANY_SOCKET, whatever socket it holds) and that socket is stale: closed, or with
 *    ends other than the key's. Emits one struct cad_rec, with the socket it met.
 *
 * The layouts of both records are mirrored in src/identity.rs; both sides assert the sizes.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "vmlinux_min.h"
#include "sock_ends.h"

#define AF_INET 2
#define AF_INET6 10
#define EIO 5

#define KEY_LEN 44
/* enum sock_flags: bit 0 of sk_flags. */
#define SOCK_DEAD 0
/* struct identity_rec's flags. */
#define IDENTITY_ORPHANED 1
/* Targets per compare-and-delete pass; userspace sends larger batches in chunks. */
#define CAD_BATCH 8192

/* Outcomes stored in struct cad_target and emitted in struct cad_rec; a negative outcome
 * is the error bpf_map_delete_elem returned. */
#define CAD_PENDING 0
#define CAD_DELETED 1
#define CAD_COOKIE_CHANGED 2
/* Same socket, but alive with the key's ends now (it reconnected to the key's tuple): kept. */
#define CAD_NOT_STALE 3

/* struct cad_target flags: an L7-proxy entry, whose A side is the gateway: only the local
 * end (B) is compared. */
#define CAD_LOCAL_ONLY 1
/* No cookie to compare: the entry goes if the socket it holds is stale, whichever it is (a
 * collision: the key's tuple belongs to the live connection that could not be filed). */
#define CAD_ANY_SOCKET 2

#define TCP_CLOSE 7
/* Key layout (Cilium's struct sock_key): A (16 bytes), B (16), family u8 (1 IPv4, 2 IPv6),
 * pad, port A and port B, each big-endian in the first two bytes of a u32. */
#define KEY_FAMILY 32
#define KEY_PORT_A 36
#define KEY_PORT_B 40
#define KEY_IPV4 1
#define KEY_IPV6 2

struct raw_key {
	__u8 bytes[KEY_LEN];
};

struct identity_rec {
	struct raw_key key;     /* 0: the entry's key, as the map holds it */
	__u16 family;           /* 44: AF_INET or AF_INET6 (the held socket's skc_family) */
	__u8 state;             /* 46: skc_state (TCP_ESTABLISHED 1 ... TCP_CLOSE 7) */
	__u8 pad;               /* 47 */
	__u64 cookie;           /* 48: bpf_get_socket_cookie, what sock_diag calls idiag_cookie */
	__u8 local_addr[16];    /* 56: skc_rcv_saddr (first 4 bytes) or skc_v6_rcv_saddr */
	__u8 remote_addr[16];   /* 72: skc_daddr (first 4 bytes) or skc_v6_daddr */
	__u16 local_port;       /* 88: skc_num, host order */
	__u16 remote_port;      /* 90: skc_dport converted to host order */
	__u32 netns_inode;      /* 92: skc_net.net->ns.inum */
	__u64 inode;            /* 96: sk_socket->file->f_inode->i_ino (fstat's st_ino), or 0 */
	__s32 error;            /* 104: sk_err */
	__u32 flags;            /* 108: IDENTITY_ORPHANED */
};
_Static_assert(sizeof(struct identity_rec) == 112, "identity_rec layout is shared with Rust");

struct cad_target {
	__u64 cookie;           /* the cookie of the socket that was judged stale */
	__s32 outcome;          /* CAD_PENDING until the entry is met, then its outcome */
	__u32 flags;            /* CAD_LOCAL_ONLY, CAD_ANY_SOCKET */
};

struct cad_rec {
	struct identity_rec held; /* 0: the key, and the socket the entry held when met */
	__s32 outcome;          /* 112: CAD_DELETED, CAD_COOKIE_CHANGED, CAD_NOT_STALE or -errno */
	__u32 pad;              /* 116 */
};
_Static_assert(sizeof(struct cad_rec) == 120, "cad_rec layout is shared with Rust");

/* Replaced by the iterated sockhash (bpf_map__reuse_fd) before load: a helper needs a map
 * the verifier knows, and the iterator's ctx->map is no such map. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, struct raw_key);
	__type(value, __u32);
} held SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CAD_BATCH);
	__type(key, struct raw_key);
	__type(value, struct cad_target);
} targets SEC(".maps");

/* SOCK_DEAD, wherever this kernel keeps the flags (sock_common since 6.x, sock before). */
static __always_inline int sock_dead(struct sock *sk)
{
	if (bpf_core_field_exists(sk->__sk_common.skc_flags))
		return (sk->__sk_common.skc_flags >> SOCK_DEAD) & 1;
	return (sk->sk_flags >> SOCK_DEAD) & 1;
}

/* The inode of the file that refers to the socket; 0 when no struct socket or no file does.
 * Where the sock caches its inode number (what sock_diag reports), that one load replaces the
 * chain file -> inode -> i_ino: two dependent cache misses per entry on a full map's read. The
 * cache is read only behind sk_socket: before "net: clear sk->sk_ino in sk_set_socket(sk,
 * NULL)" an orphan or an accept queue's child kept a stale number there. */
static __always_inline __u64 file_inode(struct sock *sk)
{
	struct socket *sock = sk->sk_socket;
	struct file *file;
	struct inode *inode;

	if (!sock)
		return 0;
	file = sock->file;
	if (!file)
		return 0;
	if (bpf_core_field_exists(sk->sk_ino))
		return sk->sk_ino;
	inode = file->f_inode;
	return inode ? inode->i_ino : 0;
}

/* The held socket's cookie, family, ends and state: what judges an entry. */
static __always_inline void fill_ends(struct identity_rec *rec, struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;

	rec->family = family;
	rec->state = sk->__sk_common.skc_state;
	rec->cookie = bpf_get_socket_cookie(sk);
	if (family == AF_INET6) {
		v6_ends(sk, (__u32 *)rec->local_addr, (__u32 *)rec->remote_addr);
	} else {
		*(__u32 *)rec->local_addr = sk->__sk_common.skc_rcv_saddr;
		*(__u32 *)rec->remote_addr = sk->__sk_common.skc_daddr;
	}
	rec->local_port = sk->__sk_common.skc_num;
	rec->remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
}

/* The entry's key and what it holds; rec must be zeroed. */
static __always_inline void fill_identity(struct identity_rec *rec, struct sock *sk)
{
	struct net *net;

	/* First what lies furthest: the inode's chain of loads, and struct sock's lines past
	 * sock_common, so that their cache misses overlap the rest rather than follow it. */
	rec->inode = file_inode(sk);
	rec->error = sk->sk_err;
	if (sock_dead(sk))
		rec->flags |= IDENTITY_ORPHANED;
	fill_ends(rec, sk);
	net = sk->__sk_common.skc_net.net;
	if (net)
		rec->netns_inode = net->ns.inum;
}

/* Set by userspace before each read (the object's .bss): nonzero for the ends alone
 * (fill_ends), with inode, error, flags and netns_inode left 0. The continuous pass judges by
 * the ends alone, and the rest reaches struct sock's far lines, its file and its namespace:
 * most of the program's cache misses. */
__u32 ends_only = 0;

SEC("iter/sockmap")
int identity(struct bpf_iter__sockmap *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = ctx->sk;
	void *key = ctx->key;
	struct identity_rec rec;

	if (!key || !sk)
		return 0;
	__builtin_memset(&rec, 0, sizeof(rec));
	/* The key sits after pointers in the map's element: word loads, not 44 byte loads. */
	__builtin_memcpy(&rec.key, __builtin_assume_aligned(key, 4), sizeof(rec.key));
	if (ends_only)
		fill_ends(&rec, sk);
	else
		fill_identity(&rec, sk);
	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}

/* An address as 16 bytes, IPv4 mapped (::ffff:a.b.c.d), so that an IPv4 key and a dual-stack
 * socket compare as the userspace classifier compares them. */
static __always_inline void mapped_v4(__u32 *out, __u32 v4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0xffff);
	out[3] = v4;
}

static __always_inline int same16(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Whether sk has exactly the ends its key files it under: its local end is B, its remote end
 * A (with local_only, the local end alone). An unknown key or socket family never matches
 * here; userspace never judges such an entry stale, so it is never a target. */
static __always_inline int has_key_ends(struct sock *sk, const struct raw_key *key,
					int local_only)
{
	const __u8 *k = key->bytes;
	__u16 family = sk->__sk_common.skc_family;
	__u32 key_a[4], key_b[4], local[4], remote[4], v4;
	__u16 port_a = ((__u16)k[KEY_PORT_A] << 8) | k[KEY_PORT_A + 1];
	__u16 port_b = ((__u16)k[KEY_PORT_B] << 8) | k[KEY_PORT_B + 1];

	if (k[KEY_FAMILY] == KEY_IPV4) {
		/* Byte copies: the key has no alignment. */
		__builtin_memcpy(&v4, &k[0], 4);
		mapped_v4(key_a, v4);
		__builtin_memcpy(&v4, &k[16], 4);
		mapped_v4(key_b, v4);
	} else if (k[KEY_FAMILY] == KEY_IPV6) {
		__builtin_memcpy(key_a, &k[0], 16);
		__builtin_memcpy(key_b, &k[16], 16);
	} else {
		return 0;
	}
	if (family == AF_INET) {
		mapped_v4(local, sk->__sk_common.skc_rcv_saddr);
		mapped_v4(remote, sk->__sk_common.skc_daddr);
	} else if (family == AF_INET6) {
		v6_ends(sk, local, remote);
	} else {
		return 0;
	}
	if (sk->__sk_common.skc_num != port_b || !same16(local, key_b))
		return 0;
	return local_only ||
	       (bpf_ntohs(sk->__sk_common.skc_dport) == port_a && same16(remote, key_a));
}

SEC("iter/sockmap")
int compare_and_delete(struct bpf_iter__sockmap *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = ctx->sk;
	void *ctx_key = ctx->key;
	struct cad_target *target;
	struct raw_key key;
	struct cad_rec rec;
	long err;

	if (!ctx_key || !sk)
		return 0;
	/* Helpers take keys from the stack, not from the context's buffer. */
	__builtin_memcpy(&key, __builtin_assume_aligned(ctx_key, 4), sizeof(key));
	target = bpf_map_lookup_elem(&targets, &key);
	if (!target)
		return 0;
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.held.key = key;
	fill_identity(&rec.held, sk);
	/* The outcome is kept in the target, so an entry shown again (the sockhash iterator
	 * restarts its current bucket after each read) is judged and deleted at most once. */
	if (target->outcome == CAD_PENDING) {
		if (!(target->flags & CAD_ANY_SOCKET) && rec.held.cookie != target->cookie) {
			target->outcome = CAD_COOKIE_CHANGED;
		} else if (sk->__sk_common.skc_state != TCP_CLOSE &&
			   has_key_ends(sk, &key, target->flags & CAD_LOCAL_ONLY)) {
			/* The verdict no longer holds: the socket reconnected to the key's tuple. */
			target->outcome = CAD_NOT_STALE;
		} else {
			err = bpf_map_delete_elem(&held, &key);
			target->outcome = err == 0 ? CAD_DELETED : (err < 0 ? (__s32)err : -EIO);
		}
	}
	rec.outcome = target->outcome;
	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
