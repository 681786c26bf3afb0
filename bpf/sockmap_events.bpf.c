// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Reports, through a ring buffer, the two moments that make a sockhash entry stale or
 * harmful, so that userspace reacts within milliseconds instead of at its next pass:
 *  - on_close (tp_btf/inet_sock_set_state): a socket that still has a psock, so is filed in
 *    some sockmap or sockhash, goes to TCP_CLOSE (a reset while its application keeps the fd;
 *    since Linux 5.16 such a socket stays in the map). An ordinary close detaches the psock
 *    before the state changes, and every other transition is dropped after one comparison,
 *    so ordinary TCP traffic costs almost nothing.
 *  - on_update (fexit/sock_hash_update_common): an insert into the watched sockhash refused
 *    with EEXIST: a new connection collided with the entry filed under its key.
 *
 * Both fill one struct event_rec, mirrored in src/events.rs; both sides assert its size.
 * Tracing programs need fentry/fexit/tp_btf support, which some kernels refuse (EPERM);
 * on_update also needs bpf_probe_read_kernel for the key (lockdown's confidentiality mode
 * refuses it). Userspace loads what the kernel accepts and says which.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "vmlinux_min.h"
#include "sock_ends.h"

#define AF_INET6 10
#define EEXIST 17
#define TCP_CLOSE 7
#define SK_USER_DATA_NOCOPY 1UL

#define KEY_LEN 44

#define EVENT_CLOSE 1
#define EVENT_COLLISION 2

struct event_rec {
	__u32 kind;             /* 0: EVENT_CLOSE or EVENT_COLLISION */
	__u32 map_id;           /* 4: collision: the map that refused the insert */
	__u64 cookie;           /* 8: the closing socket, or the one that could not be filed */
	__u8 key[KEY_LEN];      /* 16: collision: the refused key, as the map holds it */
	__u16 family;           /* 60: AF_INET or AF_INET6 */
	__u8 old_state;         /* 62: close: the state left (TCP_ESTABLISHED 1 ...) */
	__u8 pad;               /* 63 */
	__u8 local_addr[16];    /* 64: skc_rcv_saddr (first 4 bytes) or skc_v6_rcv_saddr */
	__u8 remote_addr[16];   /* 80: skc_daddr (first 4 bytes) or skc_v6_daddr */
	__u16 local_port;       /* 96: inet_sport in host order (skc_num is 0 once unhashed) */
	__u16 remote_port;      /* 98: skc_dport in host order */
	__u32 netns_inode;      /* 100: skc_net.net->ns.inum */
	__u64 ktime_ns;         /* 104: bpf_ktime_get_ns, CLOCK_MONOTONIC */
};
_Static_assert(sizeof(struct event_rec) == 112, "event_rec layout is shared with Rust");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Slot 0: the id of the watched sockhash (0 until userspace sets it: no collision is
 * reported). Slot 1: records lost to a full ring buffer. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} control SEC(".maps");

#define CONTROL_MAP_ID 0
#define CONTROL_LOST 1

static __always_inline void fill_socket(struct event_rec *rec, const struct sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	struct net *net;
	__u16 family;

	family = sk->__sk_common.skc_family;
	rec->family = family;
	rec->cookie = bpf_get_socket_cookie((void *)sk);
	if (family == AF_INET6) {
		v6_ends(sk, (__u32 *)rec->local_addr, (__u32 *)rec->remote_addr);
	} else {
		*(__u32 *)rec->local_addr = sk->__sk_common.skc_rcv_saddr;
		*(__u32 *)rec->remote_addr = sk->__sk_common.skc_daddr;
	}
	if (tp)
		rec->local_port = bpf_ntohs(tp->inet_conn.icsk_inet.inet_sport);
	else
		rec->local_port = sk->__sk_common.skc_num;
	rec->remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
	net = sk->__sk_common.skc_net.net;
	if (net)
		rec->netns_inode = net->ns.inum;
	rec->ktime_ns = bpf_ktime_get_ns();
}

static __always_inline struct event_rec *reserve(void)
{
	struct event_rec *rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	__u32 slot = CONTROL_LOST;
	__u64 *lost;

	if (rec) {
		__builtin_memset(rec, 0, sizeof(*rec));
		return rec;
	}
	lost = bpf_map_lookup_elem(&control, &slot);
	if (lost)
		__sync_fetch_and_add(lost, 1);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_close, const struct sock *sk, int oldstate, int newstate)
{
	struct event_rec *rec;

	if (newstate != TCP_CLOSE)
		return 0;
	if (!((unsigned long)sk->sk_user_data & SK_USER_DATA_NOCOPY))
		return 0;
	rec = reserve();
	if (!rec)
		return 0;
	rec->kind = EVENT_CLOSE;
	rec->old_state = oldstate;
	fill_socket(rec, sk);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

SEC("fexit/sock_hash_update_common")
int BPF_PROG(on_update, struct bpf_map *map, void *key, struct sock *sk, __u64 flags, int ret)
{
	__u32 slot = CONTROL_MAP_ID;
	struct event_rec *rec;
	__u64 *watched;
	__u32 id;

	if (ret != -EEXIST)
		return 0;
	id = map->id;
	watched = bpf_map_lookup_elem(&control, &slot);
	if (!watched || *watched != id || map->key_size != KEY_LEN)
		return 0;
	rec = reserve();
	if (!rec)
		return 0;
	rec->kind = EVENT_COLLISION;
	rec->map_id = id;
	if (bpf_probe_read_kernel(rec->key, KEY_LEN, key)) {
		bpf_ringbuf_discard(rec, 0);
		return 0;
	}
	fill_socket(rec, sk);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
