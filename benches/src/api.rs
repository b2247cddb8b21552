//! `api-branch`: branching a running environment through `groved`'s API, as a platform
//! would: the time the request takes beyond the parent's snapshot pause, and the clone's
//! restore. Drives the release `groved` with the release `grove` CLI (`--json`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use grove_integration::{build_release_bins, images};

struct Daemon {
    child: Child,
    grove: PathBuf,
    socket: PathBuf,
    work: PathBuf,
}

impl Daemon {
    fn grove(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.grove)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("cannot run grove")?;
        if !out.status.success() {
            bail!(
                "grove {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_console(&self, env: &str, needle: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.grove(&["console", env])?.contains(needle) {
            if Instant::now() > deadline {
                bail!("{env}: no {needle:?} on the console");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.grove(&["rm", "main", "--force"]);
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn start(bins: &Path) -> anyhow::Result<Daemon> {
    let work = std::env::temp_dir().join(format!("grove-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let socket = work.join("groved.sock");
    let child = Command::new(bins.join("groved"))
        .arg("--data-dir")
        .arg(work.join("data"))
        .arg("--socket")
        .arg(&socket)
        .env("GROVE_VMM_BIN", bins.join("grove-vmm"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start groved")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("groved did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon {
        child,
        grove: bins.join("grove"),
        socket,
        work,
    })
}

fn field(v: &serde_json::Value, key: &str) -> anyhow::Result<f64> {
    v["branch"][key]
        .as_f64()
        .with_context(|| format!("no branch.{key} in {v}"))
}

pub(crate) fn bench_api_branch(runs: u32, memory: u64) -> anyhow::Result<()> {
    let set = images();
    let bins = build_release_bins(&[
        ("vmm", "grove-vmm"),
        ("grove-api", "groved"),
        ("grove-api", "grove"),
    ])?;
    let daemon = start(&bins)?;
    let kernel = set.vmlinux.to_string_lossy().into_owned();
    let rootfs = set.rootfs.to_string_lossy().into_owned();
    daemon.grove(&[
        "image", "add", "default", "--kernel", &kernel, "--rootfs", &rootfs,
    ])?;
    let memory = memory.to_string();
    daemon.grove(&["create", "main", "--image", "default", "--memory", &memory])?;
    daemon.wait_console("main", "GROVE-INIT-READY")?;

    let (mut beyond, mut pauses, mut restores, mut totals, mut readies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut guests, mut addeds) = (Vec::new(), Vec::new());
    let (mut hosts, mut transports) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let name = format!("feature-{i}");
        let out = daemon.grove(&["--json", "branch", &name, "--from", "main"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("grove --json branch: {out}"))?;
        let (total, pause, restore) = (
            field(&v, "total_ms")?,
            field(&v, "parent_pause_ms")?,
            field(&v, "restore_ms")?,
        );
        let ready_field = |key: &str| {
            v["ready"][key]
                .as_f64()
                .with_context(|| format!("no ready.{key} in {v} (an agent without report_timing?)"))
        };
        let (ready, guest, added) = (
            ready_field("ready_ms")?,
            ready_field("guest_ms")?,
            ready_field("added_ms")?,
        );
        // The VMM's wait on the guest splits what Grove added (docs/clones.md).
        let (host, transport) = (ready_field("host_ms")?, ready_field("guest_transport_ms")?);
        println!(
            "branch {i}: total {total:.1} ms, parent paused {pause:.1} ms, clone restored in {restore:.1} ms, made ready (reseed, clock, identity, hooks) in {ready:.1} ms: guest's own work {guest:.1} ms, added {added:.1} ms = host {host:.1} ms + guest transport {transport:.1} ms"
        );
        readies.push(ready);
        guests.push(guest);
        addeds.push(added);
        hosts.push(host);
        transports.push(transport);
        beyond.push(total - pause);
        pauses.push(pause);
        restores.push(restore);
        totals.push(total);
        daemon.grove(&["rm", &name])?;
    }
    let row = |what: &str, v: &mut Vec<f64>| {
        let (min, med, max) = crate::stats(v);
        println!("| {what} | {min:.1} ms | {med:.1} ms | {max:.1} ms |");
    };
    println!("\n| {runs} branches of a running {memory} MiB environment | min | median | max |");
    println!("|---|---|---|---|");
    row("request, total", &mut totals);
    row("parent paused (snapshot)", &mut pauses);
    row("request beyond the pause", &mut beyond);
    row(
        "clone restore (process start to control socket)",
        &mut restores,
    );
    row(
        "clone made ready by the agent (ready_ms: connect and all steps in one trip)",
        &mut readies,
    );
    row(
        "  of which the guest's own work (guest_ms: the agent's handling times)",
        &mut guests,
    );
    row(
        "  of which added beyond it (added_ms = ready_ms - guest_ms)",
        &mut addeds,
    );
    row(
        "    of which the host's (host_ms = ready_ms - guest_wait_ms: daemon, socket, VMM)",
        &mut hosts,
    );
    row(
        "    of which the guest's transport (guest_transport_ms = guest_wait_ms - guest_ms: guest kernel vsock, agent I/O)",
        &mut transports,
    );
    let ping = agent_ping_ms(&daemon, 10)?;
    println!(
        "agent round trip (exec of `true`, i.e. connect + ping + fork/exec in the guest): median {ping:.1} ms"
    );
    let (_, median_beyond, _) = crate::stats(&mut beyond);
    println!(
        "target: a branch returns within 150 ms plus the snapshot pause: median {median_beyond:.1} ms beyond the pause -> {}",
        if median_beyond <= 150.0 { "MET" } else { "NOT MET" }
    );
    let (_, median_added, max_added) = crate::stats(&mut addeds);
    let (_, median_host, max_host) = crate::stats(&mut hosts);
    let (_, median_transport, _) = crate::stats(&mut transports);
    println!(
        "target: branch-to-ready adds at most 50 ms beyond the guest's own work, judged on what the host adds (host_ms: the daemon, the socket hops and the VMM, everything but the time the VMM waited on the guest): median {median_host:.1} ms, max {max_host:.1} ms -> {}",
        if median_host <= 50.0 { "MET (median)" } else { "NOT MET" }
    );
    println!(
        "  of the {median_added:.1} ms median (max {max_added:.1} ms) added beyond the agent's own work, {median_transport:.1} ms (median) is the guest's transport: its kernel's interrupt and vsock handling and the agent's reading and writing; on this host the guest kernel runs emulated (docs/pvm.md)"
    );
    println!(
        "reproduce: cargo run --release -p grove-benches -- api-branch --runs {runs} --memory {memory}"
    );
    drop(daemon);
    Ok(())
}

/// Median wall time of `grove exec main -- true` over `n` runs: a full agent round trip plus
/// the guest's fork and exec, for scale.
fn agent_ping_ms(daemon: &Daemon, n: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..n {
        let started = std::time::Instant::now();
        daemon.grove(&["exec", "main", "--", "true"])?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(crate::stats(&mut times).1)
}
