//! `grove-vmm`: a KVM micro-VM monitor.
//!
//! The library builds a VM from a [`config::VmConfig`] ([`builder::build_and_start`]) and
//! returns a running [`runtime::Vmm`] that can be paused, resumed, stopped and waited on.
//! The `grove-vmm` binary is a thin command line over it. Everything here is synchronous:
//! one thread per vCPU plus one event-loop thread for device I/O.

pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod disk;
pub mod event_loop;
pub mod exit;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod jail;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

pub use builder::{build_and_start, BuildError, ConsoleIo};
pub use config::{DiskConfig, VmConfig, VsockConfig};
pub use exit::VmExit;
pub use runtime::Vmm;
