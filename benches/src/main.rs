//! `grove-bench`: Grove's benchmarks. Each prints its figures and the command that
//! reproduces them; docs/benchmarks.md records the results with the machine they ran on.
//!
//! - `boot`: VMM start to the guest init's write to the boot-complete port (0x3f0), and to
//!   the VMM's exit after the guest's immediate reset (`grove.bench=boot`).
//! - `memory`: the VMM's own memory: resident set minus the guest memory the guest touched.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use grove_integration::{boot_time_ms, build_release_vmm, images, VmProcess, BOOT_TIMEOUT};

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
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
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

fn bench_boot(vmm: &PathBuf, runs: u32, memory: u64, vcpus: u8, bzimage: bool) -> anyhow::Result<()> {
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

fn bench_memory(vmm: &PathBuf, memory: u64) -> anyhow::Result<()> {
    let set = images();
    let mut vm = VmProcess::spawn(
        vmm,
        [
            "run".to_string(),
            "--kernel".into(),
            set.vmlinux.display().to_string(),
            "--rootfs".into(),
            format!("{},ro", set.rootfs.display()),
            "--memory".into(),
            memory.to_string(),
        ],
    );
    vm.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT).map_err(anyhow::Error::msg)?;
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
    }
}
