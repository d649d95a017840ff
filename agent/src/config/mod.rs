//! Configuration: Kubernetes-shaped YAML documents -> a validated [`Config`] (file mode).
//! Parsing and validation never bind a port or touch the kernel, so `weft-agent validate`
//! and the reload path share them.

pub mod authz;
mod load;
mod model;
pub mod policy;
pub mod quarantine;
pub mod route;
pub mod watch;

pub use load::{
    load_path, load_sources, load_str, ConfigError, Location, Source, LABEL_AGENT_DOWN, LABEL_MESH,
    LABEL_MTLS,
};
pub use model::{
    AgentDown, AppProtocol, Config, Mtls, Namespace, Node, Protocol, Service, ServicePort,
    TargetPort, Workload, WorkloadPort,
};

#[cfg(test)]
mod tests;
