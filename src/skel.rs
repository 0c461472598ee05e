//! The generated skeletons of the XDP programs in bpf/.
#![allow(clippy::all, missing_docs, non_camel_case_types, dead_code)]

/// The load balancer (bpf/lb.bpf.c).
pub mod lb {
    include!(concat!(env!("OUT_DIR"), "/lb.skel.rs"));
}

/// The pass-everything program (bpf/pass.bpf.c).
pub mod pass {
    include!(concat!(env!("OUT_DIR"), "/pass.skel.rs"));
}

/// What the skeleton's types cannot list, read from the same BTF by
/// build.rs: the variants of `enum lb_stat`.
pub mod lb_stat {
    include!(concat!(env!("OUT_DIR"), "/lb_stat.rs"));
}

/// The IP-in-IP decapsulation program of IPIP backends (bpf/decap.bpf.c).
pub mod decap {
    include!(concat!(env!("OUT_DIR"), "/decap.skel.rs"));
}
