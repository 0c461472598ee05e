/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * One pass of the family-generic pipeline (see fam.h): lb.bpf.c includes
 * this file once per address family. The headers below compile what does
 * not depend on the family once (their *_ONCE blocks) and the rest once per
 * pass; fragments and ICMP errors have a header per family. No include guard,
 * on purpose.
 */
#include "fam.h"
#include "ctstate.h"
#include "select.h"
#include "halfopen.h"
#include "route.h"
#include "nat.h"
#include "natport.h"
#include "conntrack.h"
#include "ipip.h"
#include "dsr.h"
#if !LB_V6
#include "frag.h"
#include "icmp.h"
#else
#include "frag6.h"
#include "icmp6.h"
#endif
#include "flow.h"
