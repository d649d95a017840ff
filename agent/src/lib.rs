//! weft-agent: the per-node daemon of the weft service mesh. It loads the eBPF datapath
//! that steers pod sockets into its own proxy, and runs that proxy for every pod of its node.

pub mod admin;
pub mod app;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod enroll;
pub mod handoff;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod peer;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod traffic;
