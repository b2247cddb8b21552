//! Grove's control plane.
//!
//! `groved` keeps the state of images, environments and snapshots in SQLite, supervises one
//! `grove-vmm` process per environment, and serves the HTTP API (`api/openapi.yaml`);
//! `grove` is its command line. The HTTP layer ([`http`]) knows nothing of VMs: it calls a
//! [`service::Service`], which the orchestrator implements.

pub mod backend;
pub mod client;
pub mod error;
pub mod guest_agent;
pub mod http;
pub mod jail;
pub mod model;
pub mod names;
pub mod network;
pub mod orchestrator;
pub mod paths;
pub mod service;
pub mod signing;
pub mod store;
pub mod supervisor;
