//! `grove-bench`: Grove's benchmarks. Each prints its figures and the command that
//! reproduces them; docs/benchmarks.md records the results with the machine they ran on.
//!
//! - `boot`: VMM start to the guest init's write to the boot-complete port (0x3f0), and to
//!   the VMM's exit after the guest's immediate reset (`grove.bench=boot`).
//! - `memory`: the VMM's own memory: resident set minus the guest memory the guest touched.
//! - `snapshot`: live against paused snapshots per guest size and dirty rate (`live.rs`).
//! - `uffd-wp`: the cost of the userfaultfd write-protect alternative (`uffd.rs`).
//! - `restore`: restore latency and clone memory.
//! - `disk-branch`, `disk-io`: branching a qcow2 disk, and in-guest disk throughput of raw,
//!   qcow2 and a qcow2 chain (`disk.rs`).
//! - `api-branch`: branching a running environment through `groved`'s API (`api.rs`).

mod api;
mod disk;
mod live;
mod uffd;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use grove_integration::{
    boot_time_ms, build_release_vmm, images, TempDir, VmProcess, BOOT_TIMEOUT,
};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotInfo, SnapshotMode, SnapshotRequest};

#[derive(Parser)]
#[command(name = "grove-bench", about = "Grove benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot time of the default image: VMM start -> guest init signals boot complete.
    Boot {
        /// Number of boots.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Boot the bzImage instead of the ELF vmlinux (PVH).
        #[arg(long)]
        bzimage: bool,
    },
    /// VMM memory overhead with the default image booted and idle at its shell.
    Memory {
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
    },
    /// Pause length and total time of live and paused snapshots of the running default
    /// image, per guest size and per rate at which the guest dirties memory.
    Snapshot {
        /// Guest sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048")]
        sizes: Vec<u64>,
        /// Dirty rates in MiB/s (0: idle).
        #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
        rates: Vec<u64>,
        /// Snapshots per size, rate and mode.
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Restore latency (process start -> vCPUs running, -> first guest console output) and
    /// the resident memory of concurrent clones of one snapshot.
    Restore {
        /// Number of sequential restores timed.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Concurrent clones whose memory is measured.
        #[arg(long, default_value_t = 10)]
        clones: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
    },
    /// Time to branch a qcow2 disk (what a snapshot does to it), per disk size, on the host;
    /// then the disk branch inside one real snapshot with a 20 GiB data disk.
    DiskBranch {
        /// Disk sizes in GiB.
        #[arg(long, value_delimiter = ',', default_value = "1,20")]
        sizes_gib: Vec<u64>,
        /// Branches in a row per size.
        #[arg(long, default_value_t = 10)]
        runs: u32,
    },
    /// In-guest disk throughput (grove-disktool, 4 KiB O_DIRECT) of a raw disk, a qcow2
    /// overlay and a 5-layer qcow2 chain, in one boot of the default image.
    DiskIo {
        /// MiB transferred per mode (the first SIZE MiB of each disk; each 4 KiB request
        /// costs ~12 ms in the guest here, so 16 MiB takes ~15 minutes in all).
        #[arg(long, default_value_t = 16)]
        size_mib: u64,
    },
    /// The userfaultfd write-protect alternative to pre-copy, on plain memory: the time to
    /// write-protect a guest-sized mapping (in the pause) and one write fault's round trip
    /// through a copying handler (after it).
    UffdWp {
        /// Memory sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048")]
        sizes: Vec<u64>,
        /// Write faults timed per size.
        #[arg(long, default_value_t = 2000)]
        faults: usize,
    },
    /// Branch a running environment through groved's API: the request's time beyond the
    /// parent's snapshot pause, and the clone's restore.
    ApiBranch {
        /// Branches, one after the other (each deleted after).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// The environment's memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
    },
}

fn host_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "PVM nested KVM (guest kernel mode emulated)"
    } else {
        "KVM"
    };
    format!("{cpu}, {cores} cores, {kvm}")
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let median = if values.len() % 2 == 1 {
        values[values.len() / 2]
    } else {
        (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
    };
    (values[0], median, values[values.len() - 1])
}

fn bench_boot(vmm: &Path, runs: u32, memory: u64, vcpus: u8, bzimage: bool) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let set = images();
    let kernel = if bzimage { &set.bzimage } else { &set.vmlinux };
    let mut to_port = Vec::new();
    let mut to_exit = Vec::new();
    for run in 1..=runs {
        let started = Instant::now();
        let mut vm = VmProcess::spawn(
            vmm,
            [
                "run".to_string(),
                "--kernel".into(),
                kernel.display().to_string(),
                "--rootfs".into(),
                format!("{},ro", set.rootfs.display()),
                "--memory".into(),
                memory.to_string(),
                "--vcpus".into(),
                vcpus.to_string(),
                "--cmdline".into(),
                "console=ttyS0 reboot=k panic=1 quiet grove.bench=boot".into(),
            ],
        );
        let status = vm.wait_exit(BOOT_TIMEOUT).map_err(anyhow::Error::msg)?;
        let wall = started.elapsed();
        if !status.success() {
            bail!("run {run}: grove-vmm exited with {status}\n{}", vm.log());
        }
        let port = boot_time_ms(&vm.log()).context("no boot-complete line in the VMM log")?;
        println!(
            "run {run}: boot-complete port {port:.1} ms, process exit {:.1} ms",
            wall.as_secs_f64() * 1e3
        );
        to_port.push(port);
        to_exit.push(wall.as_secs_f64() * 1e3);
    }
    let (min, med, max) = stats(&mut to_port);
    let (emin, emed, emax) = stats(&mut to_exit);
    println!("host: {}", host_description());
    println!(
        "guest: {} , {memory} MiB, {vcpus} vCPU(s), rootfs {}",
        kernel.display(),
        set.rootfs.display()
    );
    println!("boot to init (port 0x3f0): min {min:.1} ms, median {med:.1} ms, max {max:.1} ms over {runs} runs");
    println!("VMM start to exit:         min {emin:.1} ms, median {emed:.1} ms, max {emax:.1} ms");
    println!(
        "reproduce: cargo run --release -p grove-benches -- boot --runs {runs} --memory {memory} --vcpus {vcpus}{}",
        if bzimage { " --bzimage" } else { "" }
    );
    Ok(())
}

/// Resident kB of the mapping of exactly `size_kb` (the guest RAM) and of the whole process.
fn rss_split(pid: u32, guest_kb: u64) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
    let mut total = 0;
    let mut guest = 0;
    let mut current_size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(v)) => current_size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total += rss;
                if current_size == guest_kb {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

fn bench_memory(vmm: &Path, memory: u64) -> anyhow::Result<()> {
    let mut vm = boot_default(vmm, memory, None, &[])?;
    // Let the guest settle at its shell prompt.
    std::thread::sleep(Duration::from_secs(2));
    let (total_kb, guest_kb) = rss_split(vm.pid(), memory * 1024)?;
    vm.send_line("reboot -f");
    let _ = vm.wait_exit(Duration::from_secs(60));
    let overhead = total_kb.saturating_sub(guest_kb);
    println!("host: {}", host_description());
    println!("guest: {memory} MiB, 1 vCPU, default image idle at its shell");
    println!(
        "VMM RSS {:.2} MiB = guest memory touched {:.2} MiB + VMM overhead {:.2} MiB",
        total_kb as f64 / 1024.0,
        guest_kb as f64 / 1024.0,
        overhead as f64 / 1024.0
    );
    println!("reproduce: cargo run --release -p grove-benches -- memory --memory {memory}");
    Ok(())
}

/// Boots the default image (root filesystem read-only), with a control socket if asked and
/// extra `--disk` arguments (/dev/vdb onwards), and waits for its shell.
fn boot_default(
    vmm: &Path,
    memory: u64,
    sock: Option<&Path>,
    disks: &[String],
) -> anyhow::Result<VmProcess> {
    let set = images();
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        set.vmlinux.display().to_string(),
        "--rootfs".into(),
        format!("{},ro", set.rootfs.display()),
        "--memory".into(),
        memory.to_string(),
    ];
    if let Some(sock) = sock {
        args.push("--control".into());
        args.push(sock.display().to_string());
    }
    for disk in disks {
        args.push("--disk".into());
        args.push(disk.clone());
    }
    let mut vm = VmProcess::spawn(vmm, args);
    vm.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT)
        .map_err(anyhow::Error::msg)?;
    Ok(vm)
}

fn control(sock: &Path) -> anyhow::Result<ControlClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ControlClient::connect(sock) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// A full snapshot of the VM behind `client`, which runs on afterwards.
fn take_snapshot(client: &mut ControlClient, dir: &Path) -> anyhow::Result<SnapshotInfo> {
    take_snapshot_mode(client, dir, SnapshotMode::Paused)
}

/// A full snapshot taken in `mode`; the VM runs on afterwards.
fn take_snapshot_mode(
    client: &mut ControlClient,
    dir: &Path,
    mode: SnapshotMode,
) -> anyhow::Result<SnapshotInfo> {
    let req = SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: Default::default(),
        parent: None,
        resume: true,
        mode,
    };
    match client.request(Request::Snapshot(req))? {
        Response::Snapshot(info) => Ok(info),
        other => bail!("snapshot failed: {other:?}"),
    }
}

/// Parses "vCPUs running: X ms after VMM start".
fn vcpus_running_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("vCPUs running:"))?;
    line.split("vCPUs running:")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn bench_restore(vmm: &Path, runs: u32, clones: u32, memory: u64) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = TempDir::new("bench-restore");
    let sock = work.path().join("source.sock");
    let mut source = boot_default(vmm, memory, Some(&sock), &[])?;
    // A guest that prints continuously (shell builtins only), so the first console output
    // after a restore comes right after its vCPUs run.
    source.send_line("while :; do echo T; done > /dev/console &");
    source.wait_for("T\nT", Duration::from_secs(60)).ok();
    let snap = work.path().join("snap");
    let mut client = control(&sock)?;
    take_snapshot(&mut client, &snap)?;
    let _ = client.request(Request::Shutdown);
    let _ = source.wait_exit(Duration::from_secs(60));

    let mut to_running = Vec::new();
    let mut to_output = Vec::new();
    for run in 1..=runs {
        let started = Instant::now();
        let mut clone = VmProcess::spawn(
            vmm,
            ["restore", "--snapshot", snap.to_str().unwrap_or_default()],
        );
        clone
            .wait_for("T", Duration::from_secs(60))
            .map_err(anyhow::Error::msg)?;
        let output_ms = started.elapsed().as_secs_f64() * 1e3;
        let deadline = Instant::now() + Duration::from_secs(10);
        let running = loop {
            if let Some(ms) = vcpus_running_ms(&clone.log()) {
                break ms;
            }
            if Instant::now() > deadline {
                bail!("run {run}: no 'vCPUs running' line: {}", clone.log());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        println!("run {run}: vCPUs running {running:.2} ms after VMM start, first console output {output_ms:.1} ms after spawn");
        to_running.push(running);
        to_output.push(output_ms);
        drop(clone);
    }

    // Concurrent clones: resident memory beyond the guest pages each one maps.
    let mut vms: Vec<VmProcess> = (0..clones)
        .map(|_| {
            VmProcess::spawn(
                vmm,
                ["restore", "--snapshot", snap.to_str().unwrap_or_default()],
            )
        })
        .collect();
    for vm in &mut vms {
        vm.wait_for("T", Duration::from_secs(120))
            .map_err(anyhow::Error::msg)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut overheads = Vec::new();
    let mut guest_rss = Vec::new();
    for vm in &vms {
        let (total, guest) = rss_split(vm.pid(), memory * 1024)?;
        overheads.push(total.saturating_sub(guest) as f64 / 1024.0);
        guest_rss.push(guest as f64 / 1024.0);
    }
    drop(vms);

    let (rmin, rmed, rmax) = stats(&mut to_running);
    let (omin, omed, omax) = stats(&mut to_output);
    let (vmin, vmed, vmax) = stats(&mut overheads);
    let (_, gmed, _) = stats(&mut guest_rss);
    println!("host: {}", host_description());
    println!("guest: default image, {memory} MiB, 1 vCPU, printing continuously");
    println!("restore, process start -> vCPUs running: min {rmin:.2} ms, median {rmed:.2} ms, max {rmax:.2} ms over {runs} runs");
    println!("restore, spawn -> first console output:  min {omin:.1} ms, median {omed:.1} ms, max {omax:.1} ms");
    println!(
        "{clones} concurrent clones: VMM memory beyond the guest pages each maps: min {vmin:.2} MiB, median {vmed:.2} MiB, max {vmax:.2} MiB (guest pages mapped, median {gmed:.1} MiB, shared page cache)"
    );
    println!("reproduce: cargo run --release -p grove-benches -- restore --runs {runs} --clones {clones} --memory {memory}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let vmm = build_release_vmm()?;
    match cli.bench {
        Bench::Boot {
            runs,
            memory,
            vcpus,
            bzimage,
        } => bench_boot(&vmm, runs, memory, vcpus, bzimage),
        Bench::Memory { memory } => bench_memory(&vmm, memory),
        Bench::DiskBranch { sizes_gib, runs } => disk::bench_disk_branch(&vmm, &sizes_gib, runs),
        Bench::DiskIo { size_mib } => disk::bench_disk_io(&vmm, size_mib),
        Bench::UffdWp { sizes, faults } => uffd::bench_uffd_wp(&sizes, faults),
        Bench::ApiBranch { runs, memory } => api::bench_api_branch(runs, memory),
        Bench::Snapshot { sizes, rates, runs } => live::bench_snapshot(&vmm, &sizes, &rates, runs),
        Bench::Restore {
            runs,
            clones,
            memory,
        } => bench_restore(&vmm, runs, clones, memory),
    }
}
