//! Compiles the XDP programs in bpf/ and generates their Rust skeletons,
//! and the list of `enum lb_stat`'s variants, which the skeleton's types
//! cannot enumerate.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;
use libbpf_rs::btf::{types::Enum, Btf};

const PROGRAMS: &[&str] = &["lb", "pass", "fwd", "decap"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH is set by cargo");
    let vmlinux = format!("-Ivmlinux/{arch}");

    for name in PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        SkeletonBuilder::new()
            .source(&src)
            .obj(out.join(format!("{name}.bpf.o")))
            .clang_args([
                vmlinux.as_str(),
                "-Ibpf",
                "-Wall",
                "-Werror",
                "-O2",
                "-mcpu=v3",
            ])
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {src}: {e:#}"));
    }
    stat_variants(&out.join("lb.bpf.o"), &out.join("lb_stat.rs"));
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed=vmlinux");
}

/// Writes the variants of `enum lb_stat` (bpf/lb.h) below `LB_STAT_MAX`,
/// read from the BTF of `obj`, and the counter names made of them (`LB_`
/// stripped, lower case) to `dest`. Their values must run from 0 in order:
/// they index the `stats` map.
fn stat_variants(obj: &Path, dest: &Path) {
    let btf = Btf::from_path(obj).unwrap_or_else(|e| panic!("BTF of {}: {e}", obj.display()));
    let e: Enum<'_> = btf
        .type_by_name("lb_stat")
        .expect("enum lb_stat in the BTF of lb.bpf.o (struct lb_shared anchors it)");
    let mut variants = Vec::new();
    for (i, m) in e.iter().enumerate() {
        let name = m
            .name
            .and_then(|n| n.to_str())
            .expect("enum lb_stat variants have names");
        assert_eq!(
            m.value, i as i64,
            "enum lb_stat: {name} is {}, not {i}: the values index the stats map from 0",
            m.value
        );
        if name == "LB_STAT_MAX" {
            break;
        }
        let counter = name
            .strip_prefix("LB_")
            .unwrap_or_else(|| panic!("enum lb_stat: {name} does not start with LB_"))
            .to_ascii_lowercase();
        variants.push((name.to_string(), counter));
    }
    assert_eq!(
        e.iter().last().and_then(|m| m.name),
        Some(std::ffi::OsStr::new("LB_STAT_MAX")),
        "enum lb_stat ends with LB_STAT_MAX"
    );
    let mut s = String::from(
        "/// The variants of `enum lb_stat` below `LB_STAT_MAX`, by value (build.rs).\n\
         pub const LB_STAT_VARIANTS: &[&str] = &[\n",
    );
    for (v, _) in &variants {
        writeln!(s, "    {v:?},").unwrap();
    }
    s.push_str(
        "];\n\n/// The counter names: the variants without `LB_`, in lower case.\n\
         pub const LB_STAT_NAMES: &[&str] = &[\n",
    );
    for (_, c) in &variants {
        writeln!(s, "    {c:?},").unwrap();
    }
    s.push_str("];\n");
    std::fs::write(dest, s).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
