//! The BPF filesystem where links and maps are pinned.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Default pin directory of an `lb` instance.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

fn is_bpffs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` can be created on a bpffs: mounts bpffs at
/// /sys/fs/bpf when the directory lies there and nothing is mounted yet.
pub fn ensure_mounted(pin_dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        mount(
            Some("bpf"),
            root,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("bpffs is not mounted at {BPFFS_ROOT} and mounting it failed"))?;
    }
    let parent = pin_dir.parent().unwrap_or(root);
    if !is_bpffs(parent) {
        bail!(
            "pin directory {} is not on a bpf filesystem (its parent {} is not bpffs)",
            pin_dir.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Pin paths of one `lb` instance.
#[derive(Debug, Clone)]
pub struct PinDir {
    /// The instance's directory.
    pub root: PathBuf,
}

impl PinDir {
    /// The instance rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// A map shared by every interface of the instance.
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The settings of the instance's program (its .rodata map).
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    /// Directory of one attached interface.
    pub fn iface_dir(&self, iface: &str) -> PathBuf {
        self.root.join(iface)
    }

    /// The bpf_link that keeps the program attached to `iface`.
    pub fn link(&self, iface: &str) -> PathBuf {
        self.iface_dir(iface).join("link")
    }

    /// Interfaces with a pinned link, sorted by name.
    pub fn interfaces(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", self.root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.link(&name).exists() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a pin if it exists.
    pub fn remove(path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing pin {}", path.display())),
        }
    }

    /// Removes a directory if it exists and is empty.
    pub fn remove_dir_if_empty(path: &Path) {
        let _ = fs::remove_dir(path);
    }
}
