//! Replays the committed fuzz corpora (`integration/fuzz/corpus/<target>/`: minimized seeds
//! and every crash found, see docs/fuzzing.md) through the same functions the cargo-fuzz
//! targets call, so a fixed crash stays fixed under plain `cargo test`. Needs no KVM and no
//! image.

use std::path::PathBuf;

type Target = fn(&[u8]);

/// Every fuzz target: the name of its `fuzz_targets/<name>.rs` and corpus directory, and its
/// function.
const TARGETS: &[(&str, Target)] = &[
    ("virtio_queue", vmm::fuzzing::virtio_queue),
    ("block_requests", vmm::fuzzing::block_requests),
    ("vsock_packets", vmm::fuzzing::vsock_packets),
    ("mmio_registers", vmm::fuzzing::mmio_registers),
    ("snapshot_state", vmm::fuzzing::snapshot_state),
    ("qcow2_image", vmm::fuzzing::qcow2_image),
    ("control_protocol", vmm::fuzzing::control_protocol),
    ("agent_protocol", agent::fuzzing::agent_protocol),
    ("http_requests", grove_api::http::fuzzing::http_requests),
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn replay(name: &str, target: Target) {
    let dir = fuzz_dir().join("corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        // A panic names the file: rerun it alone with `cargo fuzz run <target> <file>`.
        eprintln!("{name}: {}", file.display());
        target(&data);
    }
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_corpus() {
    let targets = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = std::fs::read_dir(&targets)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            path.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "fuzz_targets/ and TARGETS differ");
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let (name, target) = TARGETS
                    .iter()
                    .find(|(n, _)| *n == stringify!($name))
                    .expect("listed in TARGETS");
                replay(name, *target);
            }
        )*
    };
}

replay_tests!(
    virtio_queue,
    block_requests,
    vsock_packets,
    mmio_registers,
    snapshot_state,
    qcow2_image,
    control_protocol,
    agent_protocol,
    http_requests,
);
