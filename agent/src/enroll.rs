//! Enrolling a meshed pod of this node: open its netns, prepare its routing for delivery,
//! create (or take over) the agent's two listeners inside it, register it with the
//! datapath, and start its proxies.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    sync::Arc,
};

use tokio::task::JoinHandle;
use weft_common::{DELIVERY_MARK, DELIVERY_TABLE, INBOUND_PORT, OUTBOUND_PORT};

use crate::{
    config::Workload,
    datapath::{Datapath, DatapathError},
    handoff::{Inherited, ListenerKind},
    netns::{HostNetns, PodNetns},
    proxy::{
        conn::{Pod, PodConns},
        inbound::Inbound,
        listener::PodListener,
        outbound::Outbound,
        ProxyInputs,
    },
};

const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("workload {0} has no spec.netns: in file mode the agent needs the pod's network namespace path")]
    NoNetns(String),
    #[error("workload {workload}: {action}: {source}")]
    Io {
        workload: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("workload {workload}: routing setup in {netns}: {message}")]
    Routing {
        workload: String,
        netns: String,
        message: String,
    },
    #[error("workload {workload}: {source}")]
    Datapath {
        workload: String,
        source: Box<DatapathError>,
    },
}

/// A pod the agent serves: its netns and the tasks of its proxies.
pub struct Enrolled {
    pub workload: Workload,
    pub netns: Arc<PodNetns>,
    /// The pod as the proxy sees it (deliveries to it go through this).
    pub pod: Arc<Pod>,
    /// The listeners, kept for handing over to a successor agent.
    pub listeners: Vec<(ListenerKind, std::os::fd::OwnedFd)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn enroll(
    dp: &mut Datapath,
    w: &Workload,
    host: &Arc<HostNetns>,
    inputs: &ProxyInputs,
    inherited: &mut Inherited,
) -> Result<Enrolled, EnrollError> {
    let mut opened = None;
    let res = enroll_inner(dp, w, host, inputs, inherited, &mut opened);
    if let (Err(e), Some(netns)) = (&res, opened) {
        // The pod exists but is not served: fence it, so its posture holds (fail-closed:
        // refused both ways) instead of it being unmeshed until an enrolment succeeds.
        match dp.enroll(w, &netns, None::<&std::net::TcpListener>) {
            Ok(()) => {
                tracing::warn!(workload = %w.id(), error = %e, "enrolment failed; the pod is fenced (its agentDown posture applies) until it succeeds")
            }
            Err(f) => {
                tracing::error!(workload = %w.id(), error = %f, "enrolment failed and the pod could not be fenced either")
            }
        }
    }
    res
}

fn enroll_inner(
    dp: &mut Datapath,
    w: &Workload,
    host: &Arc<HostNetns>,
    inputs: &ProxyInputs,
    inherited: &mut Inherited,
    opened: &mut Option<Arc<PodNetns>>,
) -> Result<Enrolled, EnrollError> {
    let id = w.id();
    let io = |action: &'static str| {
        let workload = id.clone();
        move |source| EnrollError::Io {
            workload,
            action,
            source,
        }
    };
    let path = w
        .netns
        .as_ref()
        .ok_or_else(|| EnrollError::NoNetns(id.clone()))?;
    let netns = Arc::new(PodNetns::open(path, host.clone()).map_err(io("opening its netns"))?);
    *opened = Some(netns.clone());
    prepare_routing(&netns).map_err(|message| EnrollError::Routing {
        workload: id.clone(),
        netns: path.display().to_string(),
        message,
    })?;
    let mut listen =
        |kind: ListenerKind, addr: SocketAddrV4| -> Result<std::net::TcpListener, EnrollError> {
            match inherited.take(netns.cookie(), kind) {
                Some(l) => Ok(l),
                None => netns.listen(addr, BACKLOG).map_err(io(kind.action())),
            }
        };
    let outbound = listen(
        ListenerKind::Outbound,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
    )?;
    let inbound = listen(
        ListenerKind::Inbound,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, INBOUND_PORT),
    )?;
    dp.enroll(w, &netns, Some(&inbound))
        .map_err(|source| EnrollError::Datapath {
            workload: id.clone(),
            source: Box::new(source),
        })?;

    let mut listeners = Vec::new();
    for (kind, l) in [
        (ListenerKind::Outbound, &outbound),
        (ListenerKind::Inbound, &inbound),
    ] {
        listeners.push((
            kind,
            l.try_clone().map_err(io("duplicating a listener"))?.into(),
        ));
    }
    let to_tokio = |l: std::net::TcpListener| {
        tokio::net::TcpListener::from_std(l).map_err(io("registering a listener"))
    };
    let shared = Arc::new(Pod {
        sockets: netns.clone(),
        ip: w.ip,
        inputs: inputs.clone(),
        conns: Arc::new(PodConns::default()),
    });
    let pod = |listener| -> Result<PodListener, EnrollError> {
        Ok(PodListener {
            listener: to_tokio(listener)?,
            pod: shared.clone(),
        })
    };
    let tasks = vec![
        tokio::spawn(Outbound::new(pod(outbound)?).run()),
        tokio::spawn(Inbound::new(pod(inbound)?).run()),
    ];
    tracing::info!(workload = %id, ip = %w.ip, netns = %path.display(), cookie = netns.cookie(), "enrolled");
    Ok(Enrolled {
        workload: w.clone(),
        netns,
        pod: shared,
        listeners,
        tasks,
    })
}

/// Inside the pod's netns: route packets carrying DELIVERY_MARK to the local stack, and let
/// accepted connections inherit the mark of their SYN (tcp_fwmark_accept). Together they
/// bring the app's replies to the agent's transparent delivery sockets, with no iptables.
/// Idempotent.
fn prepare_routing(netns: &PodNetns) -> Result<(), String> {
    let mark = format!("{DELIVERY_MARK:#x}");
    let table = DELIVERY_TABLE.to_string();
    netns
        .run(|| -> Result<(), String> {
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")
                .map_err(|e| format!("setting net.ipv4.tcp_fwmark_accept: {e}"))?;
            let rules = ip(&["-4", "rule", "show", "fwmark", &mark])?;
            if !rules.contains(&format!("lookup {table}")) {
                ip(&[
                    "-4", "rule", "add", "fwmark", &mark, "lookup", &table, "priority", "100",
                ])?;
            }
            ip(&[
                "-4",
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ])?;
            Ok(())
        })
        .map_err(|e| format!("entering the netns: {e}"))?
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
