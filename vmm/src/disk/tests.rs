//! Disk chain tests: overlays, chains, branching and compaction on real files, each image
//! checked with `qemu-img check` (qemu-utils) and compared with `qemu-img compare`.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;

/// A directory removed when dropped (also when the test fails).
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("grove-disk-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Frozen layers are read-only; the directory is not.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `qemu-img` with `args`; its output, or a panic naming the command and its output.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect(
        "these tests need qemu-img (Debian package qemu-utils, in images/host-packages.txt)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?} failed: {text}");
    text
}

/// `qemu-img check` must find nothing wrong (leaks included).
fn check_clean(path: &Path) {
    let text = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        text.contains("No errors were found"),
        "{}: {text}",
        path.display()
    );
}

/// `qemu-img compare` of a qcow2 chain against a raw file.
fn assert_same_as_raw(qcow2: &Path, raw: &Path) {
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        qcow2.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

/// Opens a disk image the test has no handle on any more (see [`retry_while_locked`]).
fn open(opts: &OpenOptions) -> Result<DiskImage, DiskError> {
    retry_while_locked(
        || chain::open(opts),
        |e| matches!(e, DiskError::Locked { .. }),
    )
}

/// Compacts a chain the test has no handle on any more (see [`retry_while_locked`]).
fn compact(top: &Path, refs: &[PathBuf]) -> Result<compact::CompactReport, DiskError> {
    retry_while_locked(
        || compact::compact(top, refs),
        |e| matches!(e, DiskError::Locked { .. }),
    )
}

/// A raw file whose 4 KiB block `i` is filled with `(i % 251) as u8 + 1`.
fn raw_base(path: &Path, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size / 4096)
        .flat_map(|i| std::iter::repeat_n((i % 251) as u8 + 1, 4096))
        .collect();
    fs::write(path, &data).unwrap();
    data
}

fn qcow2_opts(path: &Path, read_only: bool) -> OpenOptions {
    let mut o = OpenOptions::new(path, DiskFormat::Qcow2, read_only);
    o.allow_backing = true;
    o
}

fn read_all(image: &DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

fn raw(path: &Path) -> LayerRecord {
    LayerRecord {
        path: path.to_path_buf(),
        format: DiskFormat::Raw,
    }
}

fn qcow2(path: &Path) -> LayerRecord {
    LayerRecord {
        path: path.to_path_buf(),
        format: DiskFormat::Qcow2,
    }
}

#[test]
fn raw_images_must_be_whole_sectors() {
    let d = Dir::new("raw");
    fs::write(d.join("odd.raw"), vec![0u8; 1000]).unwrap();
    let e = open(&OpenOptions::new(d.join("odd.raw"), DiskFormat::Raw, false)).unwrap_err();
    assert!(
        matches!(e, DiskError::UnalignedSize { size: 1000, .. }),
        "{e}"
    );
    let e = open(&OpenOptions::new(d.join("missing"), DiskFormat::Raw, false)).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    fs::write(d.join("ok.raw"), vec![7u8; 4096]).unwrap();
    let image = open(&OpenOptions::new(d.join("ok.raw"), DiskFormat::Raw, false)).unwrap();
    assert_eq!((image.size(), image.chain().len()), (4096, 1));
}

#[test]
fn unallocated_clusters_read_through_and_writes_stay_in_the_overlay() {
    let d = Dir::new("overlay");
    let base = d.join("base.raw");
    let mut expected = raw_base(&base, 4 * MIB);
    let top = d.join("top.qcow2");
    create_overlay(&top, Some(&raw(&base)), 4 * MIB).unwrap();
    check_clean(&top);

    let image = open(&qcow2_opts(&top, false)).unwrap();
    assert_eq!(image.size(), 4 * MIB);
    assert_eq!(image.chain(), &[qcow2(&top), raw(&base)]);
    // Nothing allocated yet: every byte comes from the base.
    assert_eq!(read_all(&image), expected);
    // A sector in the middle of a cluster: the rest of the cluster still reads the base.
    let at = 3 * CLUSTER + 512;
    image.write_at(&[0xee; 512], at).unwrap();
    expected[at as usize..at as usize + 512].fill(0xee);
    // A write crossing a cluster boundary.
    let at = 5 * CLUSTER - 2048;
    image.write_at(&[0xdd; 4096], at).unwrap();
    expected[at as usize..at as usize + 4096].fill(0xdd);
    assert_eq!(read_all(&image), expected);
    image.flush().unwrap();
    drop(image);

    // The base never changed; the overlay holds the difference.
    let base_now = fs::read(&base).unwrap();
    assert_eq!(base_now, raw_base(&d.join("again.raw"), 4 * MIB));
    check_clean(&top);
    let want = d.join("want.raw");
    fs::write(&want, &expected).unwrap();
    assert_same_as_raw(&top, &want);
    let info = qemu_img(&["info", top.to_str().unwrap()]);
    assert!(info.contains("backing file format: raw"), "{info}");
}

#[test]
fn lookups_go_through_a_five_deep_chain_to_the_right_layer() {
    let d = Dir::new("chain");
    let base = d.join("base.raw");
    let mut expected = raw_base(&base, 2 * MIB);
    let mut below = raw(&base);
    // Layer k writes cluster k and overwrites cluster 0.
    for k in 1..=4u64 {
        let path = d.join(&format!("l{k}.qcow2"));
        create_overlay(&path, Some(&below), 2 * MIB).unwrap();
        let image = open(&qcow2_opts(&path, false)).unwrap();
        let byte = 0x10 * k as u8;
        image
            .write_at(&vec![byte; CLUSTER as usize], k * CLUSTER)
            .unwrap();
        image.write_at(&[byte; 512], 0).unwrap();
        expected[(k * CLUSTER) as usize..((k + 1) * CLUSTER) as usize].fill(byte);
        expected[..512].fill(byte);
        image.flush().unwrap();
        drop(image);
        // Each layer becomes read-only for the next, as a frozen layer would.
        below = qcow2(&path);
    }
    let top = d.join("top.qcow2");
    create_overlay(&top, Some(&below), 2 * MIB).unwrap();
    let image = open(&qcow2_opts(&top, true)).unwrap();
    assert_eq!(image.chain().len(), 6);
    assert_eq!(read_all(&image), expected);
    drop(image);
    let want = d.join("want.raw");
    fs::write(&want, &expected).unwrap();
    assert_same_as_raw(&top, &want);
    for k in 1..=4 {
        check_clean(&d.join(&format!("l{k}.qcow2")));
    }

    // The depth limit counts every layer.
    let mut opts = qcow2_opts(&top, true);
    opts.max_depth = 5;
    let e = open(&opts).unwrap_err();
    assert!(
        matches!(
            e,
            DiskError::TooDeep {
                depth: 6,
                limit: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("grove-vmm disk compact"), "{e}");
    opts.max_depth = 0;
    assert!(matches!(open(&opts), Err(DiskError::DepthLimit(0))));
}

#[test]
fn backing_files_are_followed_only_when_allowed_and_with_a_stated_format() {
    let d = Dir::new("policy");
    let base = d.join("base.raw");
    raw_base(&base, MIB);
    let top = d.join("top.qcow2");
    create_overlay(&top, Some(&raw(&base)), MIB).unwrap();
    let e = open(&OpenOptions::new(&top, DiskFormat::Qcow2, false)).unwrap_err();
    assert!(matches!(e, DiskError::BackingNotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("allow_backing"), "{e}");

    // The same image without its backing-format extension: Grove does not guess.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .unwrap();
    let mut hdr = [0u8; 4096];
    file.read_exact_at(&mut hdr, 0).unwrap();
    let header_len = u32::from_be_bytes(hdr[100..104].try_into().unwrap()) as usize;
    let mut off = header_len;
    loop {
        let kind = u32::from_be_bytes(hdr[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[off + 4..off + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no backing-format extension found");
        if kind == 0xe279_2aca {
            // Turn it into an extension nobody knows.
            file.write_all_at(&0x4752_4f56u32.to_be_bytes(), off as u64)
                .unwrap();
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    drop(file);
    let e = open(&qcow2_opts(&top, false)).unwrap_err();
    assert!(matches!(e, DiskError::BackingFormatMissing { .. }), "{e}");

    // A raw image is raw even when its bytes look like qcow2 (it is never probed).
    let looks_qcow2 = d.join("guest-written.raw");
    fs::copy(&top, &looks_qcow2).unwrap();
    let len = fs::metadata(&looks_qcow2).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&looks_qcow2)
        .unwrap()
        .set_len(len.next_multiple_of(512))
        .unwrap();
    let image = open(&OpenOptions::new(&looks_qcow2, DiskFormat::Raw, true)).unwrap();
    assert_eq!(image.chain(), &[raw(&looks_qcow2)]);
}

#[test]
fn backing_loops_are_refused() {
    let d = Dir::new("loop");
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    chain::create_qcow2(&a, Some(("b.qcow2".into(), DiskFormat::Qcow2)), MIB, true).unwrap();
    chain::create_qcow2(&b, Some(("a.qcow2".into(), DiskFormat::Qcow2)), MIB, true).unwrap();
    let e = open(&qcow2_opts(&a, true)).unwrap_err();
    assert!(matches!(e, DiskError::BackingLoop { .. }), "{e}");
    // Itself as its own backing file.
    let c = d.join("c.qcow2");
    chain::create_qcow2(&c, Some(("c.qcow2".into(), DiskFormat::Qcow2)), MIB, true).unwrap();
    let e = open(&qcow2_opts(&c, true)).unwrap_err();
    assert!(matches!(e, DiskError::BackingLoop { .. }), "{e}");
}

#[test]
fn layers_are_locked_shared_and_active_layers_exclusively() {
    let d = Dir::new("locks");
    let base = d.join("base.raw");
    raw_base(&base, MIB);
    let top1 = d.join("top1.qcow2");
    let top2 = d.join("top2.qcow2");
    create_overlay(&top1, Some(&raw(&base)), MIB).unwrap();
    create_overlay(&top2, Some(&raw(&base)), MIB).unwrap();
    // Two VMs on one base, each on its own overlay.
    let a = open(&qcow2_opts(&top1, false)).unwrap();
    let b = open(&qcow2_opts(&top2, false)).unwrap();
    // Nobody may write the base they read, nor a second writer an active layer.
    let e = chain::open(&OpenOptions::new(&base, DiskFormat::Raw, false)).unwrap_err();
    assert!(matches!(e, DiskError::Locked { .. }), "{e}");
    let e = chain::open(&qcow2_opts(&top1, false)).unwrap_err();
    assert!(matches!(e, DiskError::Locked { .. }), "{e}");
    drop((a, b));
    open(&OpenOptions::new(&base, DiskFormat::Raw, false)).unwrap();
}

#[test]
fn a_branch_freezes_the_active_layer_and_continues_on_an_empty_overlay() {
    let d = Dir::new("branch");
    let base = d.join("base.raw");
    let mut expected = raw_base(&base, 2 * MIB);
    let active = d.join("vm.qcow2");
    create_overlay(&active, Some(&raw(&base)), 2 * MIB).unwrap();
    let mut image = open(&qcow2_opts(&active, false)).unwrap();
    image.write_at(&[0xaa; 4096], 8192).unwrap();
    expected[8192..8192 + 4096].fill(0xaa);

    // The first branch makes its overlay itself (no spare yet).
    let layer = image.branch().unwrap();
    let frozen = d.join("vm@1.qcow2");
    assert_eq!(layer, qcow2(&frozen));
    assert_eq!(image.chain(), &[qcow2(&active), qcow2(&frozen), raw(&base)]);
    assert_eq!(
        fs::metadata(&frozen).unwrap().permissions().mode() & 0o777,
        0o444
    );
    // Same data, and the new overlay is empty: the frozen layer holds it.
    assert_eq!(read_all(&image), expected);
    let frozen_copy = fs::read(&frozen).unwrap();
    let want_at_branch = d.join("at-branch.raw");
    fs::write(&want_at_branch, &expected).unwrap();

    // The VM goes on writing; the frozen layer never changes.
    image.write_at(&[0xbb; 4096], 8192).unwrap();
    image.write_at(&[0xcc; 4096], MIB).unwrap();
    image.flush().unwrap();
    assert_eq!(fs::read(&frozen).unwrap(), frozen_copy);
    drop(image);
    check_clean(&active);
    check_clean(&frozen);
    assert_same_as_raw(&frozen, &want_at_branch);

    // A clone: its own overlay on the frozen layer sees the disk at the branch.
    let clone = d.join("clone.qcow2");
    create_overlay(&clone, Some(&qcow2(&frozen)), 2 * MIB).unwrap();
    let mut opts = OpenOptions::new(&clone, DiskFormat::Qcow2, false);
    opts.frozen_backing = Some(qcow2(&frozen));
    let clone_image = open(&opts).unwrap();
    assert_eq!(read_all(&clone_image), expected);
    // ... and refuses an overlay on anything else.
    opts.frozen_backing = Some(raw(&base));
    drop(clone_image);
    let e = open(&opts).unwrap_err();
    assert!(matches!(e, DiskError::BackingMismatch { .. }), "{e}");

    // With a spare prepared, the next branch uses it: the next free name.
    let mut image = open(&qcow2_opts(&active, false)).unwrap();
    image.prepare_spare().unwrap();
    let spare = image.spare.clone().unwrap();
    assert_eq!(spare.1, d.join("vm@2.qcow2"));
    assert!(spare.0.exists());
    let layer = image.branch().unwrap();
    assert_eq!(layer, qcow2(&d.join("vm@2.qcow2")));
    assert!(!spare.0.exists(), "the spare became the active layer");
    assert_eq!(image.chain().len(), 4);
    assert_eq!(read_all(&image)[8192], 0xbb);
    // A spare whose name was taken meanwhile is dropped and the branch picks another name.
    image.prepare_spare().unwrap();
    let taken = image.spare.clone().unwrap().1;
    fs::write(&taken, b"someone else's").unwrap();
    let layer = image.branch().unwrap();
    assert_ne!(layer.path, taken);
    assert_eq!(fs::read(&taken).unwrap(), b"someone else's");
    assert_eq!(image.chain().len(), 5);
    // Branching past the depth limit fails and leaves the disk as it was.
    image.prepare_spare().unwrap();
    image.max_depth = 5;
    let before = image.chain().to_vec();
    let e = image.branch().unwrap_err();
    assert!(matches!(e, DiskError::TooDeep { depth: 6, .. }), "{e}");
    assert_eq!(image.chain(), before.as_slice());
    image.max_depth = 16;
    image.write_at(&[1; 512], 0).unwrap();
    image.flush().unwrap();
    drop(image);
    check_clean(&active);
    // No temporary files are left behind (dropping the image removed its spare).
    let stray: Vec<_> = fs::read_dir(&d.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn raw_and_read_only_disks_are_not_branched() {
    let d = Dir::new("nobranch");
    let base = d.join("base.raw");
    raw_base(&base, MIB);
    let mut image = open(&OpenOptions::new(&base, DiskFormat::Raw, false)).unwrap();
    let e = image.branch().unwrap_err();
    assert!(
        matches!(e, DiskError::NotBranchable { what: "raw", .. }),
        "{e}"
    );
    drop(image);
    let top = d.join("top.qcow2");
    create_overlay(&top, Some(&raw(&base)), MIB).unwrap();
    let mut image = open(&qcow2_opts(&top, true)).unwrap();
    let e = image.branch().unwrap_err();
    assert!(
        matches!(
            e,
            DiskError::NotBranchable {
                what: "read-only",
                ..
            }
        ),
        "{e}"
    );
}

/// A chain base <- l1 <- l2 <- l3 where layer k writes cluster k and sector 0; returns
/// the expected contents.
fn three_layers(d: &Dir) -> Vec<u8> {
    let base = d.join("base.raw");
    let mut expected = raw_base(&base, 2 * MIB);
    let mut below = raw(&base);
    for k in 1..=3u64 {
        let path = d.join(&format!("l{k}.qcow2"));
        create_overlay(&path, Some(&below), 2 * MIB).unwrap();
        let image = open(&qcow2_opts(&path, false)).unwrap();
        let byte = 0x20 * k as u8;
        image
            .write_at(&vec![byte; CLUSTER as usize], k * CLUSTER)
            .unwrap();
        image.write_at(&[byte; 512], 0).unwrap();
        expected[(k * CLUSTER) as usize..((k + 1) * CLUSTER) as usize].fill(byte);
        expected[..512].fill(byte);
        image.flush().unwrap();
        drop(image);
        below = qcow2(&path);
    }
    expected
}

#[test]
fn compaction_merges_unshared_layers_into_the_top_and_keeps_its_contents() {
    let d = Dir::new("compact");
    let expected = three_layers(&d);
    let want = d.join("want.raw");
    fs::write(&want, &expected).unwrap();
    let l3 = d.join("l3.qcow2");
    // A VM's overlay on l3 keeps working after l3 is replaced.
    let vm = d.join("vm.qcow2");
    create_overlay(&vm, Some(&qcow2(&l3)), 2 * MIB).unwrap();

    let report = compact(&l3, &[]).unwrap();
    assert_eq!(report.merged, vec![d.join("l2.qcow2"), d.join("l1.qcow2")]);
    assert_eq!(report.backing, Some(raw(&d.join("base.raw"))));
    assert_eq!((report.depth_before, report.depth_after), (4, 2));
    assert!(!d.join("l1.qcow2").exists() && !d.join("l2.qcow2").exists());
    check_clean(&l3);
    assert_same_as_raw(&l3, &want);
    assert_same_as_raw(&vm, &want);
    let image = open(&qcow2_opts(&vm, true)).unwrap();
    assert_eq!(image.chain().len(), 3);
    assert_eq!(read_all(&image), expected);
    // Nothing left to merge.
    drop(image);
    let report = compact(&l3, &[]).unwrap();
    assert!(report.merged.is_empty());
}

#[test]
fn compaction_stops_at_a_layer_something_else_uses() {
    let d = Dir::new("compact-shared");
    let expected = three_layers(&d);
    let want = d.join("want.raw");
    fs::write(&want, &expected).unwrap();
    // Another branch grew from l1.
    let other = d.join("other.qcow2");
    create_overlay(&other, Some(&qcow2(&d.join("l1.qcow2"))), 2 * MIB).unwrap();
    let l3 = d.join("l3.qcow2");
    let report = compact(&l3, &[]).unwrap();
    assert_eq!(report.merged, vec![d.join("l2.qcow2")]);
    assert_eq!(report.backing, Some(qcow2(&d.join("l1.qcow2"))));
    assert!(d.join("l1.qcow2").exists());
    check_clean(&l3);
    assert_same_as_raw(&l3, &want);
    check_clean(&other);

    // A layer someone writes cannot be compacted.
    let image = open(&qcow2_opts(&other, false)).unwrap();
    let e = compact::compact(&other, &[]).unwrap_err();
    assert!(matches!(e, DiskError::Locked { .. }), "{e}");
    drop(image);
}

#[test]
fn corrupt_images_are_refused_when_opened() {
    let d = Dir::new("corrupt");
    let top = d.join("top.qcow2");
    create_overlay(&top, None, MIB).unwrap();
    // The L1 table offset (header bytes 40..48) far beyond the end of the file.
    let file = fs::OpenOptions::new().write(true).open(&top).unwrap();
    file.write_all_at(&(1u64 << 40).to_be_bytes(), 40).unwrap();
    drop(file);
    let e = open(&qcow2_opts(&top, false)).unwrap_err();
    assert!(matches!(e, DiskError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("top.qcow2"), "{e}");
    // Bad magic.
    let bad = d.join("bad.qcow2");
    fs::write(&bad, vec![0u8; 65536]).unwrap();
    let e = open(&qcow2_opts(&bad, false)).unwrap_err();
    assert!(matches!(e, DiskError::Corrupt { .. }), "{e}");
}
