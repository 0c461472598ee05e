# Shared by scripts/demo, scripts/test and scripts/bench: system packages,
# bpffs, and running traffic only inside our own namespaces.

# Debian packages the build, the tests and the demo need.
LB_PACKAGES=(clang llvm libelf-dev zlib1g-dev pkg-config make bpftool iproute2
	ethtool curl python3 util-linux clang-format wrk nginx bird2)

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

require_root() {
	[ "$(id -u)" = 0 ] || die "must run as root (XDP and namespaces need CAP_BPF and CAP_NET_ADMIN)"
}

# Installs whichever of LB_PACKAGES (and "$@") are missing.
ensure_packages() {
	local missing=() p
	for p in "${LB_PACKAGES[@]}" "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	echo "installing: ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null || die "apt-get update failed"
	apt-get install -y -qq "${missing[@]}" >/dev/null || die "installing ${missing[*]} failed"
}

ensure_bpffs() {
	if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
		mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
	fi
}

# in_ns NS CMD...: run a traffic tool inside one of our namespaces, never in
# the root namespace.
in_ns() {
	local ns=$1
	shift
	[ -n "$ns" ] && [ -e "/run/netns/$ns" ] || die "refusing to run '$*' outside a namespace we created ('$ns')"
	nsenter --net="/run/netns/$ns" "$@"
}
