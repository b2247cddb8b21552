//! End-to-end snapshot and clones with the real default image: a guest process keeps state
//! (a running loop that counts, a file in tmpfs); after a snapshot, three clones each continue
//! the count from the snapshot and show the same file, writes in one clone are seen by no
//! other VM, and a fresh restore's memory is byte-identical to the source at the snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use grove_integration::{grove_vmm_bin, images, require_kvm, TempDir, VmProcess, BOOT_TIMEOUT};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest};

const WAIT: Duration = Duration::from_secs(120);

fn expect(vm: &mut VmProcess, needle: &str) {
    if let Err(report) = vm.wait_for(needle, WAIT) {
        panic!("{report}");
    }
}

/// Connects to a control socket, waiting for the VMM to create it.
fn client(sock: &Path) -> ControlClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ControlClient::connect(sock) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => {
                panic!("no control socket {}: {e}", sock.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn ok(c: &mut ControlClient, r: Request) -> Response {
    let resp = c.request(r).expect("control request");
    if let Response::Error(e) = &resp {
        panic!("control request failed: {e:?}");
    }
    resp
}

fn digest(c: &mut ControlClient) -> String {
    match ok(c, Request::MemoryDigest) {
        Response::MemoryDigest { digest, .. } => digest,
        other => panic!("{other:?}"),
    }
}

/// The last complete `TICK-n` line in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("TICK-")?.parse().ok())
}

fn first_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK-")?.parse().ok())
        .next()
}

#[test]
fn clones_continue_from_the_snapshot_and_diverge() {
    require_kvm();
    let set = images();
    let dir = TempDir::new("e2e-snapshot");
    let sock = dir.path().join("source.sock");
    let rootfs = format!("{},ro", set.rootfs.display());
    let mut source = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "run",
            "--kernel",
            set.vmlinux.to_str().unwrap(),
            "--rootfs",
            &rootfs,
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    if let Err(report) = source.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    source.send_line("echo state-$((17*3)) > /tmp/data; (i=0; while :; do i=$((i+1)); echo TICK-$i; sleep 1; done) &");
    expect(&mut source, "TICK-2");

    let mut control = client(&sock);
    ok(&mut control, Request::Pause);
    let tick_at_snapshot = last_tick(&source.console()).expect("ticks before the snapshot");
    let source_digest = digest(&mut control);
    let snap = dir.path().join("snap");
    let resp = ok(
        &mut control,
        Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: Default::default(),
            parent: None,
            resume: true,
        }),
    );
    assert!(matches!(resp, Response::Snapshot(_)));
    // Still paused (it was paused before the request): check the digest did not move.
    assert_eq!(digest(&mut control), source_digest);

    // A paused restore is byte-identical to the source at the snapshot.
    let probe_sock = dir.path().join("probe.sock");
    let mut probe = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--control",
            probe_sock.to_str().unwrap(),
            "--paused",
        ],
    );
    let mut probe_control = client(&probe_sock);
    assert_eq!(digest(&mut probe_control), source_digest);
    ok(&mut probe_control, Request::Shutdown);
    assert_eq!(
        probe
            .wait_exit(WAIT)
            .map_err(|e| e.to_string())
            .unwrap()
            .code(),
        Some(0)
    );

    ok(&mut control, Request::Resume);

    // Three clones run at once, each from the same snapshot.
    let mut clones: Vec<VmProcess> = (0..3)
        .map(|i| {
            let sock = dir.path().join(format!("clone{i}.sock"));
            VmProcess::spawn(
                &grove_vmm_bin(),
                [
                    "restore",
                    "--snapshot",
                    snap.to_str().unwrap(),
                    "--control",
                    sock.to_str().unwrap(),
                ],
            )
        })
        .collect();
    for clone in &mut clones {
        expect(clone, &format!("TICK-{}", tick_at_snapshot + 1));
        let first = first_tick(&clone.console());
        assert_eq!(
            first,
            Some(tick_at_snapshot + 1),
            "clone continues the count:\n{}",
            clone.console()
        );
        assert!(clone.log().contains("vCPUs running:"), "{}", clone.log());
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        clone.send_line(&format!("echo DATA{i}-$(cat /tmp/data)"));
        expect(clone, &format!("DATA{i}-state-51"));
    }
    // A write in clone 0 is seen by no one else.
    clones[0].send_line("echo clone0-wrote > /tmp/data; echo WROTE-$((1+1))");
    expect(&mut clones[0], "WROTE-2");
    clones[1].send_line("echo AFTER1-$(cat /tmp/data)");
    expect(&mut clones[1], "AFTER1-state-51");
    source.send_line("echo AFTERS-$(cat /tmp/data)");
    expect(&mut source, "AFTERS-state-51");

    for vm in clones.iter_mut().chain(std::iter::once(&mut source)) {
        vm.send_line("reboot -f");
        let status = vm.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
        assert_eq!(status.code(), Some(0), "{}", vm.log());
    }
}
