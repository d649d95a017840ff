//! Beside another owner's cgroup programs (a CNI or agent already on the node): weft
//! attaches with bpf_links next to them, captures as before, never detaches them, and
//! names them at start.

use std::{os::fd::AsRawFd as _, path::Path, time::Duration};

use weft_e2e::{bin, http_get, require_root, Cluster, PodSpec, ServiceSpec};

const SECS5: Duration = Duration::from_secs(5);

/// Another owner's connect4 program, loaded and attached with the bpf syscall as any
/// other loader would (BPF_F_ALLOW_MULTI): it refuses (EPERM) every connect to port
/// 9999 and allows the rest. Detached and closed when dropped.
struct Foreign {
    prog: std::os::fd::OwnedFd,
    cgroup: std::fs::File,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn put(attr: &mut [u8], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: attr is a zeroed 128-byte bpf_attr with the command's fields set, and every
    // pointer in it refers to memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Foreign {
    fn attach(cgroup: &Path) -> Self {
        // r0 = 1; r2 = ctx->user_port; if r2 != htons(9999) goto +1; r0 = 0; exit
        let port = u32::from(9999u16.to_be());
        let insns: [[u8; 8]; 5] = [
            [0xb7, 0x00, 0, 0, 1, 0, 0, 0],
            [0x61, 0x12, 24, 0, 0, 0, 0, 0],
            {
                let mut i = [0x55, 0x02, 1, 0, 0, 0, 0, 0];
                i[4..].copy_from_slice(&port.to_le_bytes());
                i
            },
            [0xb7, 0x00, 0, 0, 0, 0, 0, 0],
            [0x95, 0x00, 0, 0, 0, 0, 0, 0],
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        put(&mut attr, 4, &(insns.len() as u32).to_ne_bytes());
        put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 24, &1u32.to_ne_bytes());
        put(&mut attr, 28, &(log.len() as u32).to_ne_bytes());
        put(&mut attr, 32, &(log.as_mut_ptr() as u64).to_ne_bytes());
        put(&mut attr, 48, b"other_deny9999");
        put(&mut attr, 68, &BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut attr).unwrap_or_else(|e| {
            panic!(
                "loading the other program: {e}\n{}",
                String::from_utf8_lossy(&log)
            )
        });
        // SAFETY: the kernel just returned this descriptor to us.
        let prog =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let cgroup = std::fs::File::open(cgroup).expect("opening the cgroup");
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(cgroup.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 4, &(prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        put(&mut attr, 12, &BPF_F_ALLOW_MULTI.to_ne_bytes());
        bpf(BPF_PROG_ATTACH, &mut attr).expect("attaching the other program");
        Self { prog, cgroup }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let mut attr = [0u8; 128];
        put(
            &mut attr,
            0,
            &(self.cgroup.as_raw_fd() as u32).to_ne_bytes(),
        );
        put(&mut attr, 4, &(self.prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let _ = bpf(BPF_PROG_DETACH, &mut attr);
    }
}

#[test]
fn another_connect4_program_attached_first_keeps_running_and_is_named() {
    if !require_root("another_connect4_program_attached_first_keeps_running_and_is_named") {
        return;
    }
    let c = Cluster::builder("coexist")
        .node("a")
        .pod(PodSpec::new("client", "a").label("app", "client"))
        .pod(PodSpec::new("web", "a").label("app", "web").port(8080))
        .pod(PodSpec::new("other", "a").label("app", "other").unmeshed())
        .service(
            ServiceSpec::new("web", "10.96.0.10")
                .select("app", "web")
                .tcp(80, 8080),
        )
        .build();
    let testpod = bin("weft-testpod");
    let _web = c
        .pod("web")
        .spawn(&c.dir, &testpod, &["http-server", "8080", "web"]);
    let _other9999 = c
        .pod("other")
        .spawn(&c.dir, &testpod, &["http-server", "9999", "other-9999"]);
    let _other9998 = c
        .pod("other")
        .spawn(&c.dir, &testpod, &["http-server", "9998", "other-9998"]);
    c.pod("web").wait_listening(8080, SECS5);
    c.pod("other").wait_listening(9999, SECS5);
    c.pod("other").wait_listening(9998, SECS5);

    // The other program first, on the cgroup weft attaches to.
    let foreign = Foreign::attach(&c.node("a").cgroup);
    let a = c.start_agent("a", &[]);

    // weft's capture works: the service answers through the agent.
    let answer = http_get(c.pod("client"), "http://10.96.0.10/").expect("web answers");
    assert_eq!(answer["server"], "web");
    assert!(a.stat("proxy", "outbound_accepted") >= 1, "captured");
    // The other program still runs: 9999 is refused, 9998 beside it is not.
    let other = &c.pod("other").ip;
    http_get(c.pod("client"), &format!("http://{other}:9998/")).expect("9998 answers");
    let refused = http_get(c.pod("client"), &format!("http://{other}:9999/"))
        .expect_err("the other program refuses 9999");
    assert!(refused.contains("exit status: 7"), "{refused}");

    // The report names it, and says it runs first where it could take connections.
    let status = a.admin("/status").unwrap();
    let found = status["foreign_programs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "other_deny9999")
        .cloned()
        .unwrap_or_else(|| panic!("not reported: {status}"));
    assert_eq!(
        (&found["hook"], &found["before_weft"], &found["conflict"]),
        (
            &serde_json::json!("connect4"),
            &serde_json::json!(true),
            &serde_json::json!(true)
        )
    );
    let text = a.weftctl(&["status"]);
    assert!(
        text.contains("CONFLICT: connect4 program \"other_deny9999\""),
        "{text}"
    );
    assert!(
        a.proc.output().contains("other_deny9999"),
        "the log names it"
    );

    // Stopping weft leaves it attached and running.
    drop(a);
    http_get(c.pod("client"), &format!("http://{other}:9999/"))
        .expect_err("still refused after weft's agent stopped");
    http_get(c.pod("client"), &format!("http://{other}:9998/")).expect("9998 still answers");
    drop(foreign);
    http_get(c.pod("client"), &format!("http://{other}:9999/"))
        .expect("answers once the other program is detached");
}
