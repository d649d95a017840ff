//! Noticing configuration changes: a fingerprint of the source's file names and contents,
//! compared on an interval. Polling keeps it dependable on every filesystem (bind mounts,
//! ConfigMap symlink swaps) at a cost that is small for configuration-sized files.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::Path,
};

/// A value that changes whenever any file of the source changes, appears or disappears.
pub fn fingerprint(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    let mut files = Vec::new();
    if path.is_dir() {
        if let Ok(dir) = std::fs::read_dir(path) {
            files.extend(dir.flatten().map(|e| e.path()));
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    for f in files {
        f.hash(&mut h);
        match std::fs::read(&f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().to_string().hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content() {
        let dir = std::env::temp_dir().join(format!("weft-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        std::fs::write(&f, "x: 1").unwrap();
        let a = fingerprint(&dir);
        assert_eq!(a, fingerprint(&dir));
        std::fs::write(&f, "x: 2").unwrap();
        let b = fingerprint(&dir);
        assert_ne!(a, b);
        std::fs::write(dir.join("b.yaml"), "").unwrap();
        assert_ne!(b, fingerprint(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
