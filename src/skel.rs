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
