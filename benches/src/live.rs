//! `grove-bench snapshot`: live (pre-copy) against paused (stop-and-copy) snapshots of the
//! running default image, per guest size and per memory dirty rate. The guest dirties its
//! memory with `grove-disktool dirty 32 RATE 0` (a 32 MiB working set rewritten round robin
//! at RATE KiB/s, in user space, which runs at native speed here); "idle" runs nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use grove_integration::{images, TempDir, VmProcess, BOOT_TIMEOUT};
use vmm::control::protocol::{Request, SnapshotMode};

use crate::{control, host_description, stats, take_snapshot_mode};

/// The dirtying program's working set.
const WORKING_SET_MIB: u64 = 32;

fn wait_console(
    vm: &VmProcess,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while vm.console().matches(needle).count() < count {
        if Instant::now() > deadline {
            bail!("no {needle:?} from the guest in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Row {
    mib: u64,
    rate: u64,
    mode: SnapshotMode,
    pause: Vec<f64>,
    total: Vec<f64>,
    passes: Vec<f64>,
}

pub fn bench_snapshot(vmm: &Path, sizes: &[u64], rates: &[u64], runs: u32) -> anyhow::Result<()> {
    let work = TempDir::new("bench-snapshot");
    let set = images();
    println!("host: {}", host_description());
    let mut rows = Vec::new();
    for &mib in sizes {
        let sock = work.path().join(format!("vm{mib}.sock"));
        let rootfs = format!("{},ro", set.rootfs.display());
        let memory = mib.to_string();
        let mut vm = VmProcess::spawn(
            vmm,
            [
                "run",
                "--kernel",
                set.vmlinux.to_str().context("kernel path")?,
                "--rootfs",
                &rootfs,
                "--memory",
                &memory,
                "--vcpus",
                "2",
                "--track-dirty-pages",
                "--control",
                sock.to_str().context("socket path")?,
            ],
        );
        vm.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT)
            .map_err(anyhow::Error::msg)?;
        let mut client = control(&sock)?;
        let mut n = 0;
        let mut dirtying = 0;
        for &rate in rates {
            if rate > 0 {
                dirtying += 1;
                vm.send_line(&format!(
                    "grove-disktool dirty {WORKING_SET_MIB} {} 0 &",
                    rate * 1024
                ));
                // The working set is written once first (slow under the emulated guest
                // kernel), then the program dirties at its rate.
                wait_console(&vm, "DIRTY-READY", dirtying, Duration::from_secs(600))?;
                std::thread::sleep(Duration::from_secs(3));
            }
            for mode in [SnapshotMode::Live, SnapshotMode::Paused] {
                let mut row = Row {
                    mib,
                    rate,
                    mode,
                    pause: Vec::new(),
                    total: Vec::new(),
                    passes: Vec::new(),
                };
                for _ in 0..runs {
                    n += 1;
                    let dir = work.path().join(format!("snap{mib}-{n}"));
                    let info = take_snapshot_mode(&mut client, &dir, mode)?;
                    row.pause.push(info.pause_ms);
                    row.total.push(info.total_ms);
                    if let Some(p) = &info.precopy {
                        row.passes.push(p.passes.len() as f64);
                    }
                    std::fs::remove_dir_all(&dir)?;
                    std::thread::sleep(Duration::from_millis(500));
                }
                rows.push(row);
            }
            if rate > 0 {
                vm.send_line("kill %1; wait");
            }
        }
        let _ = client.request(Request::Shutdown);
        let _ = vm.wait_exit(Duration::from_secs(60));
    }
    println!(
        "guest MiB | dirty MiB/s | mode   | pause ms median (min-max) | total ms median | passes"
    );
    for row in &mut rows {
        let (pmin, pmed, pmax) = stats(&mut row.pause);
        let (_, tmed, _) = stats(&mut row.total);
        let passes = if row.passes.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", stats(&mut row.passes).1)
        };
        println!(
            "{:>9} | {:>11} | {:<6} | {pmed:>8.2} ({pmin:.2}-{pmax:.2}) | {tmed:>8.1} | {passes}",
            row.mib,
            if row.rate == 0 {
                "idle".to_string()
            } else {
                row.rate.to_string()
            },
            match row.mode {
                SnapshotMode::Live => "live",
                SnapshotMode::Paused => "paused",
            },
        );
    }
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!(
        "reproduce: cargo run --release -p grove-benches -- snapshot --sizes {} --rates {} --runs {runs}",
        join(sizes),
        join(rates)
    );
    Ok(())
}
