//! KVM state: the `/dev/kvm` handle, guest memory, the VM, vCPUs and their CPUID.

pub mod cpuid;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
