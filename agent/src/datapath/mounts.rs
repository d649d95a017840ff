//! Finding the cgroup2 and bpffs mounts from /proc/self/mountinfo, and mounting bpffs
//! when nothing is mounted yet. Never assume /sys/fs/cgroup: hybrid hosts mount cgroup2
//! elsewhere (e.g. /sys/fs/cgroup/unified).

use std::{io, path::PathBuf};

/// Mount points of filesystems of type `fstype`, in mountinfo order.
pub fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn mountinfo() -> io::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
}

pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    Ok(mounts_of(&mountinfo()?, "cgroup2").into_iter().next())
}

/// The bpffs to pin under: `wanted` if it is a bpffs mount, else the first bpffs mounted,
/// else `wanted` after mounting bpffs there.
pub fn ensure_bpffs(wanted: &std::path::Path) -> io::Result<PathBuf> {
    let mounted = mounts_of(&mountinfo()?, "bpf");
    if mounted.iter().any(|m| m == wanted) {
        return Ok(wanted.to_owned());
    }
    if let Some(m) = mounted.into_iter().next() {
        if wanted == std::path::Path::new(DEFAULT_BPFFS) {
            return Ok(m);
        }
    }
    std::fs::create_dir_all(wanted)?;
    nix::mount::mount(
        Some("bpf"),
        wanted,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    Ok(wanted.to_owned())
}

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
40 31 0:35 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
41 31 0:36 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
90 24 0:50 / /sys/fs/bpf rw,relatime shared:40 - bpf bpf rw
91 24 0:51 / /mnt/with\\040space rw,relatime shared:41 - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            mounts_of(SAMPLE, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn finds_bpffs_and_unescapes_paths() {
        assert_eq!(
            mounts_of(SAMPLE, "bpf"),
            [
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }
}
