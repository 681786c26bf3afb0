// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Reading a socket's own ends, shared by the identity iterator and the event programs. */
#ifndef SOCKMAP_GC_SOCK_ENDS_H
#define SOCKMAP_GC_SOCK_ENDS_H

#include "vmlinux_min.h"

/* An IPv6 socket's local and remote addresses, as four words each. */
static __always_inline void v6_ends(const struct sock *sk, __u32 *local, __u32 *remote)
{
	local[0] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[0];
	local[1] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[1];
	local[2] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[2];
	local[3] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[3];
	remote[0] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[0];
	remote[1] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[1];
	remote[2] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[2];
	remote[3] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[3];
}

#endif
