//! Other cgroup programs on the pods' hooks: a CNI or agent already on the node (Cilium's
//! socket load balancer is the common case) may attach its own. weft attaches with
//! bpf_links, which always coexist with other programs, and never detaches a program it
//! does not own. What it cannot control is order: the kernel runs every program of a
//! hook, those of the pod's own cgroup first, then its ancestors', each cgroup's in the
//! order they were attached. A program that runs before weft's on `connect4`, `connect6`
//! or `sendmsg4` can rewrite a service address before weft sees it, and weft would not
//! capture that connection. So at start the agent asks the kernel for every hook's
//! effective programs, in the order they run, and reports the others.

use std::{collections::HashMap, os::fd::AsRawFd as _};

/// The hooks weft attaches to, as the kernel's `bpf_attach_type` numbers them.
const HOOKS: [(&str, u32, bool); 6] = [
    // (hook, BPF_CGROUP_*, whether a program before weft's can take traffic from it)
    ("connect4", 10, true),
    ("connect6", 11, true),
    ("sendmsg4", 14, true),
    ("recvmsg4", 19, false),
    ("getpeername4", 29, false),
    ("sock_ops", 3, false),
];

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// The `BPF_PROG_QUERY` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// A program of another owner on one of weft's hooks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Foreign {
    pub hook: &'static str,
    pub id: u32,
    pub name: String,
    /// Whether it runs before weft's program on that hook.
    pub before_weft: bool,
    /// It runs first on a hook where it can take connections from weft.
    pub conflict: bool,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} program {:?} (id {}) runs {} weft's",
            self.hook,
            self.name,
            self.id,
            if self.before_weft { "before" } else { "after" }
        )?;
        if self.conflict {
            write!(
                f,
                ": it can rewrite a service address before weft sees it, and that connection is not captured"
            )?;
        }
        Ok(())
    }
}

/// The effective programs of one hook on `cgroup`, in the order they run.
fn effective(cgroup: &std::fs::File, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: attr points at a buffer of prog_cnt ids that outlives the call; the size
    // passed is the struct's.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt.min(64) as usize);
    Ok(ids)
}

/// Every program on weft's hooks of `cgroup` that is not one of `ours` (program ids).
pub fn foreign(cgroup: &std::fs::File, ours: &[u32]) -> std::io::Result<Vec<Foreign>> {
    let names: HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or("(unnamed)").to_owned()))
        .collect();
    let mut out = Vec::new();
    for (hook, attach_type, can_take) in HOOKS {
        let ids = effective(cgroup, attach_type)?;
        let first_ours = ids.iter().position(|id| ours.contains(id));
        for (i, id) in ids.iter().enumerate() {
            if ours.contains(id) {
                continue;
            }
            let before_weft = first_ours.is_none_or(|o| i < o);
            out.push(Foreign {
                hook,
                id: *id,
                name: names.get(id).cloned().unwrap_or_default(),
                before_weft,
                conflict: before_weft && can_take,
            });
        }
    }
    Ok(out)
}
