//! CPU compatibility of a snapshot: a vCPU restored on a host that lacks a feature the guest
//! already uses would fault at some random later instruction, so a restore checks up front
//! that this host's KVM offers every feature the snapshot's CPUID advertises.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

use crate::vstate::cpuid::CpuTemplate;

/// What a snapshot records about the CPU it was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuInfo {
    pub template: CpuTemplate,
    /// CPUID vendor string, e.g. "GenuineIntel".
    pub vendor: String,
    /// Whether the snapshot was taken on a PVM host.
    pub pvm: bool,
}

/// Feature registers compared: (leaf, subleaf, register name, which register).
const FEATURE_REGS: &[(u32, u32, &str, usize)] = &[
    (1, 0, "leaf 1 ECX", 2),
    (1, 0, "leaf 1 EDX", 3),
    (7, 0, "leaf 7 EBX", 1),
    (7, 0, "leaf 7 ECX", 2),
    (7, 0, "leaf 7 EDX", 3),
    (0x8000_0001, 0, "leaf 0x80000001 ECX", 2),
    (0x8000_0001, 0, "leaf 0x80000001 EDX", 3),
];

/// Bits KVM sets at run time whatever it supports (OSXSAVE, APIC enable, hypervisor,
/// OSPKE), and HTT, which the VMM sets for a VM of several vCPUs (topology, not a feature
/// of the host): never a reason to refuse.
fn runtime_bits(leaf: u32, reg: usize) -> u32 {
    match (leaf, reg) {
        (1, 2) => (1 << 27) | (1 << 31),
        (1, 3) => (1 << 9) | (1 << 28),
        (7, 2) => 1 << 4,
        _ => 0,
    }
}

fn reg(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, reg: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map(|e| [e.eax, e.ebx, e.ecx, e.edx][reg])
        .unwrap_or(0)
}

/// The vendor string of a CPUID table (leaf 0: EBX, EDX, ECX).
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    let mut bytes = Vec::with_capacity(12);
    for r in [1usize, 3, 2] {
        bytes.extend_from_slice(&reg(entries, 0, 0, r).to_le_bytes());
    }
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

/// Errors of the compatibility check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuCompatError {
    #[error("snapshot was taken on a {saved} CPU; this host is {host}")]
    Vendor { saved: String, host: String },
    #[error("snapshot uses CPU features this host lacks: {0}")]
    MissingFeatures(String),
    #[error("snapshot was taken with CPU template {saved}, not {requested}")]
    Template { saved: String, requested: String },
}

/// Checks that a snapshot whose vCPUs had `saved` CPUID can run on a host whose KVM supports
/// `host`, and that it was taken with `requested` template if one is asked for.
pub fn check(
    info: &CpuInfo,
    saved: &[kvm_cpuid_entry2],
    host: &CpuId,
    requested: Option<CpuTemplate>,
) -> Result<(), CpuCompatError> {
    if let Some(t) = requested {
        if t != info.template {
            return Err(CpuCompatError::Template {
                saved: info.template.name().into(),
                requested: t.name().into(),
            });
        }
    }
    let host = host.as_slice();
    let host_vendor = vendor(host);
    if info.vendor != host_vendor {
        return Err(CpuCompatError::Vendor {
            saved: info.vendor.clone(),
            host: host_vendor,
        });
    }
    let mut missing = Vec::new();
    for &(leaf, sub, name, r) in FEATURE_REGS {
        let lacking = reg(saved, leaf, sub, r) & !reg(host, leaf, sub, r) & !runtime_bits(leaf, r);
        if lacking != 0 {
            missing.push(format!("{name} bits {lacking:#x}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CpuCompatError::MissingFeatures(missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ecx1: u32, ebx7: u32) -> Vec<kvm_cpuid_entry2> {
        let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                ebx: v(b"Genu"),
                edx: v(b"ineI"),
                ecx: v(b"ntel"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: ecx1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: ebx7,
                ..Default::default()
            },
        ]
    }

    fn info() -> CpuInfo {
        CpuInfo {
            template: CpuTemplate::Host,
            vendor: "GenuineIntel".into(),
            pvm: false,
        }
    }

    #[test]
    fn subset_is_compatible_and_missing_features_are_named() {
        let host = CpuId::from_entries(&table(0b1111, 0b11)).unwrap();
        assert_eq!(vendor(host.as_slice()), "GenuineIntel");
        check(&info(), &table(0b0101, 0b01), &host, None).unwrap();
        // OSXSAVE and the hypervisor bit are run-time bits, never missing.
        check(&info(), &table((1 << 27) | (1 << 31), 0), &host, None).unwrap();
        let e = check(&info(), &table(0b10000, 0b100), &host, None).unwrap_err();
        assert_eq!(
            e,
            CpuCompatError::MissingFeatures("leaf 1 ECX bits 0x10, leaf 7 EBX bits 0x4".into())
        );
    }

    #[test]
    fn vendor_and_template_must_match() {
        let host = CpuId::from_entries(&table(0, 0)).unwrap();
        let mut amd = info();
        amd.vendor = "AuthenticAMD".into();
        assert!(matches!(
            check(&amd, &table(0, 0), &host, None),
            Err(CpuCompatError::Vendor { .. })
        ));
        let e = check(&info(), &table(0, 0), &host, Some(CpuTemplate::X86_64V2)).unwrap_err();
        assert!(
            e.to_string().contains("template host, not x86-64-v2"),
            "{e}"
        );
        check(&info(), &table(0, 0), &host, Some(CpuTemplate::Host)).unwrap();
    }
}
