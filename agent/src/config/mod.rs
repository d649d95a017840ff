//! Configuration: Kubernetes-shaped documents (YAML files, or objects from the Kubernetes
//! API) -> a validated [`Config`].
//! Parsing and validation never bind a port or touch the kernel, so `weft-agent validate`
//! and the reload path share them.

pub mod authz;
mod kube_shapes;
mod load;
mod model;
pub mod policy;
pub mod quarantine;
pub mod route;
pub mod watch;

pub use kube_shapes::LABEL_SERVICE_NAME;
pub use load::{
    endpoint_slice_from_api, from_api, load_objects, load_path, load_sources, load_str,
    ConfigError, Loaded, Location, Origin, Rejected, SliceRead, Source, ANNOTATION_CGROUP,
    ANNOTATION_NETNS, ANNOTATION_QUARANTINE, ANNOTATION_QUARANTINE_ALLOW_FROM, LABEL_AGENT_DOWN,
    LABEL_MESH, LABEL_MTLS,
};
pub use model::{
    AgentDown, AppProtocol, Config, EndpointSlice, Mtls, Namespace, Node, Protocol, Service,
    ServicePort, SliceEndpoint, SlicePort, TargetPort, Workload, WorkloadPort,
};

#[cfg(test)]
mod tests;
