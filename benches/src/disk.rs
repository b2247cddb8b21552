//! Disk benchmarks:
//!
//! - `disk-branch`: how long branching a qcow2 disk takes (what every snapshot does to each
//!   writable qcow2 disk), on the host through `vmm::disk` for several disk sizes, then once
//!   inside a real snapshot of the default image with a 20 GiB data disk.
//! - `disk-io`: in-guest throughput (`grove-disktool bench`, O_DIRECT, 4 KiB blocks) of a raw
//!   disk, a qcow2 overlay on a raw base, and a 5-layer qcow2 chain, all in one boot; plus
//!   the host-side cost per request of the same access patterns through `vmm::disk`, which
//!   is the part of a guest request the disk format can change.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use grove_integration::VmProcess;
use vmm::control::protocol::Request;
use vmm::disk::{DiskFormat, DiskImage, LayerRecord, OpenOptions};

use crate::{boot_default, control, host_description, stats, take_snapshot};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Data written into a disk before it is branched: 64 MiB in 1024 writes of 64 KiB (one
/// qcow2 cluster each), evenly spread over the whole disk, so the frozen layer's metadata
/// covers the disk's full range.
const FILL_WRITES: u64 = 1024;
const FILL_CHUNK: u64 = 64 * KIB;

/// Chain depth allowed while branching over and over (the default limit is 16).
const BRANCH_MAX_DEPTH: usize = 64;

/// The in-guest block size (grove-disktool's default).
const IO_BLOCK: u64 = 4 * KIB;
/// Size of the base file behind the disk-io disks.
const IO_BASE: u64 = 256 * MIB;
/// Data each intermediate layer of the 5-deep chain gets before boot: writes of this size,
/// this many per layer, evenly spread over the benchmarked range.
const LAYER_CHUNK: u64 = 128 * KIB;
const LAYER_WRITES: u64 = 32;

const MODES: [&str; 4] = ["seq-read", "rand-read", "seq-write", "rand-write"];

/// A scratch directory on a disk-backed file system (never tmpfs: page-cache-only files
/// would flatter every figure), removed when dropped.
struct ScratchDir {
    path: PathBuf,
    fs_type: String,
}

/// The file system type of `path` as `stat -f` names it (ext2/ext3, xfs, tmpfs, ...).
fn fs_type(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .with_context(|| format!("running stat -f on {}", path.display()))?;
    ensure!(
        out.status.success(),
        "stat -f {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl ScratchDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mut parent = std::env::temp_dir();
        let mut fs = fs_type(&parent)?;
        if fs == "tmpfs" || fs == "ramfs" {
            parent = PathBuf::from("/var/tmp");
            fs = fs_type(&parent)?;
            ensure!(
                fs != "tmpfs" && fs != "ramfs",
                "both the temporary directory and /var/tmp are in memory ({fs}); set TMPDIR to \
                 a directory on a disk"
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("grove-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating scratch directory {}", path.display()))?;
        Ok(Self { path, fs_type: fs })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A sparse raw file of `size` bytes.
fn sparse_raw(path: &Path, size: u64) -> anyhow::Result<LayerRecord> {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating sparse raw base {}", path.display()))?;
    Ok(LayerRecord {
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
    })
}

fn qcow2_overlay(path: &Path, backing: &LayerRecord, size: u64) -> anyhow::Result<LayerRecord> {
    vmm::disk::create_overlay(path, Some(backing), size)
        .with_context(|| format!("creating qcow2 overlay {}", path.display()))
}

/// Opens a disk for writing, following its backing files, with `max_depth` layers allowed.
fn open_disk(layer: &LayerRecord, max_depth: usize) -> anyhow::Result<DiskImage> {
    let mut opts = OpenOptions::new(&layer.path, layer.format, false);
    opts.allow_backing = layer.format == DiskFormat::Qcow2;
    opts.max_depth = max_depth;
    vmm::disk::open(&opts).with_context(|| format!("opening disk {}", layer.path.display()))
}

/// A recognisable, never-zero pattern for data written at `offset`.
fn fill_pattern(buf: &mut [u8], offset: u64, salt: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let v = (offset / 8 + i as u64) ^ (salt << 56) | 1;
        let bytes = v.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

/// Writes 64 MiB spread evenly over the whole disk and flushes; returns the seconds taken.
fn fill_spread(disk: &DiskImage) -> anyhow::Result<f64> {
    let size = disk.size();
    let stride = (size / FILL_WRITES) / FILL_CHUNK * FILL_CHUNK;
    ensure!(
        stride >= FILL_CHUNK,
        "a {size}-byte disk is too small for {FILL_WRITES} writes of {FILL_CHUNK} bytes"
    );
    let mut buf = vec![0u8; FILL_CHUNK as usize];
    let started = Instant::now();
    for i in 0..FILL_WRITES {
        let offset = i * stride;
        fill_pattern(&mut buf, offset, 1);
        disk.write_at(&buf, offset)
            .with_context(|| format!("writing {} at {offset}", disk.path().display()))?;
    }
    disk.flush()
        .with_context(|| format!("flushing {}", disk.path().display()))?;
    Ok(started.elapsed().as_secs_f64())
}

/// `qemu-img check` of one qcow2 file: Err with its output unless it reports no errors.
fn qemu_img_check(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .context("running qemu-img (Debian package qemu-utils)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {}",
        path.display(),
        text.trim()
    );
    Ok(())
}

/// Checks every file, printing one line each; Err naming every failure.
fn check_all(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for path in paths {
        match qemu_img_check(path) {
            Ok(()) => {}
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if failures.is_empty() {
        println!("qemu-img check: no errors in {} qcow2 file(s)", paths.len());
        Ok(())
    } else {
        bail!("qemu-img check failed:\n{}", failures.join("\n"))
    }
}

fn join_list(values: &[u64]) -> String {
    values
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until the shell answers a command (GROVE-INIT-READY comes just before it starts).
fn wait_shell(vm: &mut VmProcess) -> anyhow::Result<()> {
    vm.send_line("echo SHELL-$((20+1))");
    vm.wait_for("SHELL-21", Duration::from_secs(240))
        .map_err(anyhow::Error::msg)
}

/// Median latency in ms of a 4 KiB write + `fsync` of a file, and of a directory `fsync`
/// after creating a file in it, in `dir`: a branch is mostly such syncs.
fn fsync_latency(dir: &Path) -> anyhow::Result<(f64, f64)> {
    const ROUNDS: u64 = 20;
    let path = dir.join("fsync-probe");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let dir_file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut file_ms = Vec::new();
    let mut dir_ms = Vec::new();
    for i in 0..ROUNDS {
        file.write_all_at(&[0xa5; 4096], i * 4096)
            .with_context(|| format!("writing {}", path.display()))?;
        let started = Instant::now();
        file.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        file_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let entry = dir.join(format!("fsync-probe-{i}"));
        File::create(&entry).with_context(|| format!("creating {}", entry.display()))?;
        let started = Instant::now();
        dir_file
            .sync_all()
            .with_context(|| format!("syncing {}", dir.display()))?;
        dir_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::fs::remove_file(&entry).with_context(|| format!("removing {}", entry.display()))?;
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok((stats(&mut file_ms).1, stats(&mut dir_ms).1))
}

/// Branch timings of one disk size.
struct BranchResult {
    size_gib: u64,
    fill_s: f64,
    times_ms: Vec<f64>,
    depth: usize,
    parts: BranchParts,
}

/// Medians (ms), measured on the final chain, of the work a branch keeps out of the pause:
/// creating the next overlay (file + directory sync; done after the snapshot instead), and
/// walking, checking and reopening the layers below the active one (skipped: they stay
/// open). What it would cost otherwise, and why the branch itself is flat.
struct BranchParts {
    create_ms: f64,
    walk_ms: f64,
    open_ms: f64,
}

/// Times the pieces of a branch of `disk` (see [`BranchParts`]), 5 times each.
fn branch_parts(work: &ScratchDir, disk: &DiskImage) -> anyhow::Result<BranchParts> {
    const ROUNDS: usize = 5;
    let below = disk
        .backing()
        .first()
        .context("the branched disk has no layer below its active one")?;
    let mut opts = OpenOptions::new(&below.path, below.format, true);
    opts.allow_backing = true;
    opts.max_depth = BRANCH_MAX_DEPTH;
    let (mut create, mut walk, mut open) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let probe = work.join(&format!("probe-{i}.qcow2"));
        let started = Instant::now();
        qcow2_overlay(&probe, below, disk.size())?;
        create.push(started.elapsed().as_secs_f64() * 1e3);
        std::fs::remove_file(&probe).with_context(|| format!("removing {}", probe.display()))?;

        let started = Instant::now();
        vmm::disk::walk_chain(&opts)
            .with_context(|| format!("walking the chain below {}", below.path.display()))?;
        walk.push(started.elapsed().as_secs_f64() * 1e3);

        let started = Instant::now();
        drop(
            vmm::disk::open(&opts)
                .with_context(|| format!("opening the chain below {}", below.path.display()))?,
        );
        open.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(BranchParts {
        create_ms: stats(&mut create).1,
        walk_ms: stats(&mut walk).1,
        open_ms: stats(&mut open).1,
    })
}

fn branch_runs(work: &ScratchDir, size_gib: u64, runs: u32) -> anyhow::Result<BranchResult> {
    let size = size_gib * GIB;
    let base = sparse_raw(&work.join(&format!("base-{size_gib}g.raw")), size)?;
    let active = qcow2_overlay(&work.join(&format!("disk-{size_gib}g.qcow2")), &base, size)?;
    let mut disk = open_disk(&active, BRANCH_MAX_DEPTH)?;
    let fill_s = fill_spread(&disk)?;
    let mut times_ms = Vec::new();
    for run in 1..=runs {
        // As the VMM does: the next overlay is prepared while the VM runs, outside the pause.
        disk.prepare_spare()
            .with_context(|| format!("spare before branch {run} of the {size_gib} GiB disk"))?;
        let started = Instant::now();
        disk.branch()
            .with_context(|| format!("branch {run} of the {size_gib} GiB disk"))?;
        times_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let depth = disk.chain().len();
    let parts = branch_parts(work, &disk)?;
    let files: Vec<PathBuf> = disk
        .chain()
        .iter()
        .filter(|l| l.format == DiskFormat::Qcow2)
        .map(|l| l.path.clone())
        .collect();
    drop(disk);
    check_all(&files)?;
    Ok(BranchResult {
        size_gib,
        fill_s,
        times_ms,
        depth,
        parts,
    })
}

/// One real snapshot of the default image with a 20 GiB qcow2 data disk holding 64 MiB
/// spread over its range: the snapshot's pause and the part of it spent branching the disk.
fn branch_in_vm(vmm: &Path, work: &ScratchDir) -> anyhow::Result<()> {
    const VM_DISK_GIB: u64 = 20;
    let size = VM_DISK_GIB * GIB;
    let base = sparse_raw(&work.join("vm-base.raw"), size)?;
    let active = qcow2_overlay(&work.join("vm-data.qcow2"), &base, size)?;
    {
        let disk = open_disk(&active, vmm::disk::DEFAULT_MAX_CHAIN_DEPTH)?;
        fill_spread(&disk)?;
    }
    let sock = work.join("vm.sock");
    let disk_arg = format!("{},qcow2,backing", active.path.display());
    let mut vm = boot_default(vmm, 128, Some(&sock), &[disk_arg])?;
    wait_shell(&mut vm)?;
    let mut client = control(&sock)?;
    let info = take_snapshot(&mut client, &work.join("vm-snap"))?;
    let _ = client.request(Request::Shutdown);
    let _ = vm.wait_exit(Duration::from_secs(60));
    println!(
        "real VM (default image, 128 MiB, 20 GiB qcow2 data disk with 64 MiB written): \
         snapshot disk_branch_ms {:.2} ms, pause_ms {:.1} ms, total {:.1} ms, frozen layers {:?}",
        info.disk_branch_ms, info.pause_ms, info.total_ms, info.frozen_layers
    );
    let mut files = info.frozen_layers.clone();
    files.push(active.path.clone());
    check_all(&files)?;
    Ok(())
}

pub(crate) fn bench_disk_branch(vmm: &Path, sizes_gib: &[u64], runs: u32) -> anyhow::Result<()> {
    ensure!(runs >= 1, "--runs must be at least 1");
    ensure!(!sizes_gib.is_empty(), "--sizes-gib needs at least one size");
    ensure!(
        sizes_gib.iter().all(|&s| s >= 1),
        "--sizes-gib: sizes are whole GiB, at least 1"
    );
    let work = ScratchDir::new("bench-disk-branch")?;
    println!("host: {}", host_description());
    println!(
        "scratch directory: {} ({})",
        work.path().display(),
        work.fs_type
    );
    println!("load average at the start: {}", load_average());
    let (file_sync, dir_sync) = fsync_latency(work.path())?;
    println!(
        "this file system now: 4 KiB write + fsync {file_sync:.2} ms, directory fsync after a \
         create {dir_sync:.2} ms (medians of 20; a branch syncs the active layer, the new \
         overlay and the directory twice)"
    );
    let mut results = Vec::new();
    for &gib in sizes_gib {
        let r = branch_runs(&work, gib, runs)?;
        let per_run: Vec<String> = r.times_ms.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "{gib} GiB disk: 64 MiB written in {FILL_WRITES} spread writes ({:.2} s), branch times \
             in order (ms): {}",
            r.fill_s,
            per_run.join(" ")
        );
        results.push(r);
    }
    println!();
    println!(
        "| disk | branches | min | median | max | chain depth reached | kept out of the pause: create overlay | walk + check below | open below |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for r in &mut results {
        let (min, med, max) = stats(&mut r.times_ms);
        println!(
            "| {} GiB | {} | {min:.2} ms | {med:.2} ms | {max:.2} ms | {} layers | {:.2} ms | {:.2} ms | {:.2} ms |",
            r.size_gib, runs, r.depth, r.parts.create_ms, r.parts.walk_ms, r.parts.open_ms
        );
        medians.push((r.size_gib, med, max));
    }
    let all_under = medians.iter().all(|&(_, med, _)| med < 10.0);
    let lo = medians
        .iter()
        .map(|&(_, m, _)| m)
        .fold(f64::INFINITY, f64::min);
    let hi = medians.iter().map(|&(_, m, _)| m).fold(0.0, f64::max);
    // "The same time": medians within 1 ms or 25 % of each other, whichever is larger.
    let same = hi - lo <= f64::max(1.0, 0.25 * lo);
    println!(
        "(the last three columns: medians of 5, on the final chain, of the work a branch keeps \
         out of the pause: the next overlay with its file and directory syncs is made after \
         the snapshot; the layers below are neither re-checked nor reopened, they stay open)"
    );
    println!(
        "target: branching takes the same time whatever the size, under 10 ms: medians {lo:.2}-{hi:.2} ms -> {}",
        if all_under && same { "MET" } else { "NOT MET" }
    );
    println!();
    branch_in_vm(vmm, &work)?;
    println!("load average at the end: {}", load_average());
    println!(
        "reproduce: cargo run --release -p grove-benches -- disk-branch --sizes-gib {} --runs {runs}",
        join_list(sizes_gib)
    );
    Ok(())
}

/// The three disks of disk-io, as files.
struct IoDisks {
    raw: LayerRecord,
    overlay: LayerRecord,
    /// Top first: top, l3, l2, l1 (the raw base below them is not listed).
    chain: Vec<LayerRecord>,
}

impl IoDisks {
    fn qcow2_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.overlay)
            .chain(self.chain.iter())
            .map(|l| l.path.clone())
            .collect()
    }
}

/// A sparse raw file of [`IO_BASE`] bytes whose first `size` bytes hold the base pattern,
/// synced.
fn data_raw(path: &Path, size: u64) -> anyhow::Result<LayerRecord> {
    let layer = sparse_raw(path, IO_BASE)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    for offset in (0..size).step_by(MIB as usize) {
        fill_pattern(&mut buf, offset, 2);
        file.write_all_at(&buf, offset)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(layer)
}

/// Builds the disk-io disks in `dir`: a 256 MiB base whose first `size` bytes hold data, a
/// raw disk with the same contents, a qcow2 overlay on it, and base -> l1 -> l2 -> l3 -> top with data in
/// l1..l3.
fn prepare_io_disks(dir: &Path, size: u64) -> anyhow::Result<IoDisks> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The raw disk is written the same way as the base rather than copied: a copy would
    // fill the base's holes and leave hundreds of MiB of dirty page cache behind, whose
    // writeback would then slow down whichever disk is measured first.
    let base = data_raw(&dir.join("base.raw"), size)?;
    let raw = data_raw(&dir.join("raw.raw"), size)?;
    let overlay = qcow2_overlay(&dir.join("overlay.qcow2"), &base, IO_BASE)?;

    let mut below = base;
    let mut chain = Vec::new();
    let stride = size / LAYER_WRITES;
    ensure!(
        stride >= 4 * LAYER_CHUNK,
        "--size-mib is too small to spread {LAYER_WRITES} writes per chain layer"
    );
    for level in 1..=3u64 {
        let layer = qcow2_overlay(&dir.join(format!("chain-l{level}.qcow2")), &below, IO_BASE)?;
        let disk = open_disk(&layer, vmm::disk::DEFAULT_MAX_CHAIN_DEPTH)?;
        let mut buf = vec![0u8; LAYER_CHUNK as usize];
        for j in 0..LAYER_WRITES {
            let offset = j * stride + (level - 1) * LAYER_CHUNK;
            fill_pattern(&mut buf, offset, 2 + level);
            disk.write_at(&buf, offset)
                .with_context(|| format!("writing {}", layer.path.display()))?;
        }
        disk.flush()
            .with_context(|| format!("flushing {}", layer.path.display()))?;
        drop(disk);
        chain.push(layer.clone());
        below = layer;
    }
    let top = qcow2_overlay(&dir.join("chain-top.qcow2"), &below, IO_BASE)?;
    chain.push(top);
    chain.reverse();
    Ok(IoDisks {
        raw,
        overlay,
        chain,
    })
}

/// One `GROVE-DISKTOOL ...` line.
#[derive(Debug, Clone, Copy)]
struct IoFigure {
    mib_per_s: f64,
    iops: f64,
}

fn parse_disktool(line: &str) -> Option<IoFigure> {
    let rest = line.trim().strip_prefix("GROVE-DISKTOOL ")?;
    let field = |name: &str| -> Option<f64> {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(IoFigure {
        mib_per_s: field("mib_per_s")?,
        iops: field("iops")?,
    })
}

/// Console output after byte `from`.
fn console_since(vm: &VmProcess, from: usize) -> String {
    let all = vm.console();
    all.get(from..).unwrap_or(&all).to_string()
}

/// Runs one guest command and returns its output; Err if it does not finish in `timeout`
/// or exits non-zero.
fn guest_command(
    vm: &mut VmProcess,
    seq: u32,
    command: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let from = vm.console().len();
    // The echoed command line shows `DONE$((...))`, the output `DONE<n>:<status>`.
    let tag = 1000 + seq;
    vm.send_line(&format!("{command}; echo DONE$(({tag}+0)):$?"));
    let needle = format!("DONE{tag}:");
    let deadline = Instant::now() + timeout;
    loop {
        let out = console_since(vm, from);
        if let Some(at) = out.find(&needle) {
            let status: String = out[at + needle.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !status.is_empty() && out[at..].contains('\n') {
                ensure!(status == "0", "`{command}` exited with {status}:\n{out}");
                return Ok(out);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "`{command}` did not finish within {timeout:?}; output so far:\n{out}\n--- vmm log ---\n{}",
                vm.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Host-side cost of one disktool access pattern through `vmm::disk` (buffered, page cache
/// warm): what the VMM itself spends on the requests for each format. Returns the seconds
/// spent in the requests and in the final flush (writes only).
fn host_pattern(disk: &DiskImage, size: u64, mode: &str) -> anyhow::Result<(f64, f64)> {
    let blocks = size / IO_BLOCK;
    let mut buf = vec![0u8; IO_BLOCK as usize];
    let writing = mode.ends_with("write");
    let random = mode.starts_with("rand");
    // The same xorshift64 sequence as grove-disktool.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let started = Instant::now();
    for i in 0..blocks {
        let mut index = i;
        if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            index = x % blocks;
        }
        if writing {
            for word in buf.chunks_mut(8) {
                word.copy_from_slice(&index.to_le_bytes());
            }
            disk.write_at(&buf, index * IO_BLOCK)
        } else {
            disk.read_at(&mut buf, index * IO_BLOCK)
        }
        .with_context(|| format!("{mode} on {}", disk.path().display()))?;
    }
    let requests = started.elapsed().as_secs_f64();
    let flushed = Instant::now();
    if writing {
        disk.flush()
            .with_context(|| format!("flushing {}", disk.path().display()))?;
    }
    Ok((requests, flushed.elapsed().as_secs_f64()))
}

/// The system load average over the last minute (other work on the host skews every figure).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn pct(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.0} %", part / whole * 100.0)
    } else {
        "-".into()
    }
}

pub(crate) fn bench_disk_io(vmm: &Path, size_mib: u64) -> anyhow::Result<()> {
    ensure!(
        (16..=IO_BASE / MIB).contains(&size_mib),
        "--size-mib must be between 16 and {}",
        IO_BASE / MIB
    );
    let size = size_mib * MIB;
    let work = ScratchDir::new("bench-disk-io")?;
    println!("host: {}", host_description());
    println!(
        "scratch directory: {} ({})",
        work.path().display(),
        work.fs_type
    );
    println!("load average at the start: {}", load_average());
    let disks = prepare_io_disks(&work.join("vm"), size)?;
    let names = ["raw", "qcow2 overlay", "5-deep chain"];
    let devices = ["vdb", "vdc", "vdd"];
    let disk_args = [
        disks.raw.path.display().to_string(),
        format!("{},qcow2,backing", disks.overlay.path.display()),
        format!("{},qcow2,backing", disks.chain[0].path.display()),
    ];
    let mut vm = boot_default(vmm, 128, None, &disk_args)?;
    wait_shell(&mut vm)?;
    // Measured here: 4 KiB O_DIRECT requests cost milliseconds each in the emulated guest
    // kernel; leave room for much slower hosts.
    let timeout = Duration::from_secs(600 + 60 * size_mib);
    let mut figures = [[None::<IoFigure>; 4]; 3];
    let mut seq = 0;
    // Every disk sees the modes in the order of MODES (reads of the base data first, then
    // writes that allocate, then rewrites); the disks take turns within each mode, so a
    // change in the host's load affects all three alike.
    for (m, mode) in MODES.iter().enumerate() {
        for (d, dev) in devices.iter().enumerate() {
            seq += 1;
            let command = format!("grove-disktool bench /dev/{dev} {mode} {size_mib}");
            let started = Instant::now();
            let out = guest_command(&mut vm, seq, &command, timeout)?;
            let figure = out
                .lines()
                .find_map(parse_disktool)
                .with_context(|| format!("no GROVE-DISKTOOL line from `{command}`:\n{out}"))?;
            println!(
                "{} (/dev/{dev}) {mode}: {:.2} MiB/s, {:.1} IOPS (command took {:.1} s)",
                names[d],
                figure.mib_per_s,
                figure.iops,
                started.elapsed().as_secs_f64()
            );
            figures[d][m] = Some(figure);
        }
    }
    vm.send_line("poweroff");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .map_err(anyhow::Error::msg)?;
    ensure!(
        status.success(),
        "grove-vmm exited with {status}\n{}",
        vm.log()
    );

    println!();
    println!(
        "in-guest, grove-disktool bench, O_DIRECT, 4 KiB blocks over the first {size_mib} MiB:"
    );
    println!("| mode | raw MiB/s | raw IOPS | qcow2 overlay MiB/s | IOPS | % of raw | 5-deep chain MiB/s | IOPS | % of raw |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut worst_overlay = f64::INFINITY;
    for (m, mode) in MODES.iter().enumerate() {
        let [Some(raw), Some(ovl), Some(chain)] = [figures[0][m], figures[1][m], figures[2][m]]
        else {
            bail!("missing figures for {mode}");
        };
        worst_overlay = worst_overlay.min(ovl.mib_per_s / raw.mib_per_s * 100.0);
        println!(
            "| {mode} | {:.2} | {:.0} | {:.2} | {:.0} | {} | {:.2} | {:.0} | {} |",
            raw.mib_per_s,
            raw.iops,
            ovl.mib_per_s,
            ovl.iops,
            pct(ovl.mib_per_s, raw.mib_per_s),
            chain.mib_per_s,
            chain.iops,
            pct(chain.mib_per_s, raw.mib_per_s)
        );
    }
    println!(
        "target: qcow2 overlay >= 80 % of raw in every mode: worst {worst_overlay:.0} % -> {}",
        if worst_overlay >= 80.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );

    // The same patterns on the host, through vmm::disk, on a fresh identical set of disks:
    // the VMM's own cost per request, without the guest kernel.
    let host = prepare_io_disks(&work.join("host"), size)?;
    let host_disks = [
        open_disk(&host.raw, vmm::disk::DEFAULT_MAX_CHAIN_DEPTH)?,
        open_disk(&host.overlay, vmm::disk::DEFAULT_MAX_CHAIN_DEPTH)?,
        open_disk(&host.chain[0], vmm::disk::DEFAULT_MAX_CHAIN_DEPTH)?,
    ];
    let blocks = (size / IO_BLOCK) as f64;
    println!();
    println!(
        "host side, the same patterns through vmm::disk on a fresh identical set of disks \
         (buffered, page cache warm): µs per 4 KiB request, and the final flush of the writes:"
    );
    println!("| mode | raw | qcow2 overlay | 5-deep chain | flush raw / qcow2 / chain |");
    println!("|---|---|---|---|---|");
    for mode in MODES {
        let mut us = Vec::new();
        let mut flush_ms = Vec::new();
        for disk in &host_disks {
            let (requests, flush) = host_pattern(disk, size, mode)?;
            us.push(requests / blocks * 1e6);
            flush_ms.push(flush * 1e3);
        }
        let flushes = if mode.ends_with("write") {
            format!(
                "{:.0} / {:.0} / {:.0} ms",
                flush_ms[0], flush_ms[1], flush_ms[2]
            )
        } else {
            "-".into()
        };
        println!(
            "| {mode} | {:.2} | {:.2} | {:.2} | {flushes} |",
            us[0], us[1], us[2]
        );
    }
    drop(host_disks);
    println!("load average at the end: {}", load_average());

    let mut files = disks.qcow2_files();
    files.extend(host.qcow2_files());
    check_all(&files)?;
    println!("reproduce: cargo run --release -p grove-benches -- disk-io --size-mib {size_mib}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_disktool_line() {
        let f = parse_disktool(
            "GROVE-DISKTOOL mode=seq-read bytes=67108864 block=4096 seconds=12.5 mib_per_s=5.12 iops=1310.7\r",
        );
        let f = f.expect("parsed");
        assert_eq!(f.mib_per_s, 5.12);
        assert_eq!(f.iops, 1310.7);
        assert!(parse_disktool("grove-disktool bench /dev/vdb seq-read 64").is_none());
    }
}
