//! Who is on the other end of a local control socket. The admin API answers only root;
//! the handoff socket hands the pods' listeners only to root running the same executable
//! as this agent (the path, so an upgrade that replaced the binary still hands over).
//! The run directory holding both sockets is 0700, so other users cannot even connect.

use std::{
    io,
    os::{fd::AsFd, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading the peer's credentials: {0}")]
    Credentials(io::Error),
    #[error("peer pid {pid} runs as uid {uid}; only root may use this socket")]
    NotRoot { pid: i32, uid: u32 },
    #[error("peer pid {pid} runs {theirs}, not this agent's executable {ours}")]
    OtherExecutable {
        pid: i32,
        theirs: String,
        ours: String,
    },
}

/// The process on the other end of `sock`: its pid, after checking it runs as root.
pub fn check_root(sock: &impl AsFd) -> Result<i32, PeerError> {
    let cred = getsockopt(sock, PeerCredentials)
        .map_err(|e| PeerError::Credentials(io::Error::from(e)))?;
    if cred.uid() != 0 {
        return Err(PeerError::NotRoot {
            pid: cred.pid(),
            uid: cred.uid(),
        });
    }
    Ok(cred.pid())
}

/// The executable a process runs, as a path (an upgraded binary's old process shows
/// ` (deleted)` after its path; that part is dropped).
fn executable(pid: &str) -> io::Result<PathBuf> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let s = p.to_string_lossy();
    Ok(PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s)))
}

/// Check that the peer of `sock` is root running this agent's executable.
pub fn check_same_agent(sock: &impl AsFd) -> Result<(), PeerError> {
    let pid = check_root(sock)?;
    let ours = executable("self").map_err(PeerError::Credentials)?;
    let theirs = executable(&pid.to_string()).map_err(PeerError::Credentials)?;
    if theirs != ours {
        return Err(PeerError::OtherExecutable {
            pid,
            theirs: theirs.display().to_string(),
            ours: ours.display().to_string(),
        });
    }
    Ok(())
}

/// Create the run directory readable by root only.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_its_own_executable_and_root_here_or_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let root = nix::unistd::geteuid().is_root();
        match check_same_agent(&a) {
            Ok(()) => assert!(root),
            Err(PeerError::NotRoot { uid, .. }) => assert!(!root && uid != 0),
            Err(e) => panic!("{e}"),
        }
        drop(b);
    }
}
