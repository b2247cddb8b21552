//! The root filesystem: static busybox, its applet links, the committed init
//! and /etc files, the guest agent, as a reproducible ext4 image built without root
//! privileges (stage a directory, `mkfs.ext4 -d`, then fix owners and times with debugfs).

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use crate::agent;
use crate::apt;
use crate::cmd::{self, progress};
use crate::error::ImagesError;
use crate::inputs::{self, Input};
use crate::key::PackageVersion;

/// File name of the image.
pub(crate) const IMAGE: &str = "rootfs.ext4";
/// Image size (a sparse file).
const SIZE: u64 = 256 * 1024 * 1024;
/// File system label.
const LABEL: &str = "grove-root";
/// Fixed file system UUID (reproducible images).
const UUID: &str = "5f1c2a7e-3b9d-4c60-8e21-9a4d7b0c6e13";
/// Fixed directory hash seed (reproducible images).
const HASH_SEED: &str = "0b7e4d29-6a13-4f85-b2c7-1d9e8f305a64";
/// Every time stamp in the image: 2024-01-01T00:00:00Z.
pub(crate) const EPOCH: u64 = 1_704_067_200;

/// Directories of the image and their modes (parents before children).
const DIRS: [(&str, u32); 15] = [
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("etc/grove", 0o755),
    // The post-clone hooks run by grove-agent's `run_hooks` (empty in the default image).
    (HOOKS_DIR, 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

/// The post-clone hooks directory (`agent::server::HOOKS_DIR` in the agent crate).
pub(crate) const HOOKS_DIR: &str = "etc/grove/hooks.d";

/// `busybox --list-full` entries that are not installed as applet links.
/// `linuxrc` is for initrds; the others are replaced by committed files.
const SKIPPED_APPLETS: [&str; 2] = ["bin/busybox", "linuxrc"];

/// The committed C programs (input path) and where their binaries go (image path).
/// Each is compiled by [`compile_program`].
const PROGRAMS: [(&str, &str); 2] = [
    ("rootfs/grove-init.c", "sbin/init"),
    ("rootfs/grove-disktool.c", "usr/bin/grove-disktool"),
];

/// Compiles one committed C program (`rootfs/NAME.c`): freestanding, static, no libc,
/// reproducible (no build id). Every program gets exactly these flags.
fn compile_program(
    cc: &Path,
    work: &Path,
    input: &str,
    source: &[u8],
) -> Result<Vec<u8>, ImagesError> {
    let name = Path::new(input)
        .file_stem()
        .ok_or_else(|| ImagesError::Unexpected(format!("no file name in {input}")))?;
    let src = work.join(Path::new(name).with_extension("c"));
    let bin = work.join(name);
    cmd::write_file(&src, source)?;
    cmd::run_captured(
        Command::new(cc)
            .args([
                "-Os",
                "-static",
                "-nostdlib",
                "-ffreestanding",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-fcf-protection=none",
                "-fno-pic",
                "-no-pie",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wl,--build-id=none",
                "-o",
            ])
            .arg(&bin)
            .arg(&src),
        &format!("compiling images/{input}"),
    )?;
    fs::read(&bin).map_err(|e| ImagesError::io("read", &bin, e))
}

/// Programs used by the root filesystem build.
pub(crate) struct Tools {
    cc: PathBuf,
    cargo: PathBuf,
    dpkg_deb: PathBuf,
    tar: PathBuf,
    mkfs: PathBuf,
    debugfs: PathBuf,
    e2fsck: PathBuf,
}

/// Checks up front that everything the rootfs build needs is installed.
pub(crate) fn check_tools() -> Result<Tools, ImagesError> {
    cmd::require_tool("apt-get", "apt")?;
    Ok(Tools {
        cc: cmd::require_tool("cc", "gcc")?,
        cargo: agent::find_cargo()?,
        dpkg_deb: cmd::require_tool("dpkg-deb", "dpkg")?,
        tar: cmd::require_tool("tar", "tar")?,
        mkfs: cmd::require_tool("mkfs.ext4", "e2fsprogs")?,
        debugfs: cmd::require_tool("debugfs", "e2fsprogs")?,
        e2fsck: cmd::require_tool("e2fsck", "e2fsprogs")?,
    })
}

/// Whether `dir` holds a finished root filesystem.
pub(crate) fn is_complete(dir: &Path) -> bool {
    dir.join(IMAGE).is_file()
}

/// Where a committed `rootfs/...` input goes in the image, with its mode.
fn destinations(input: &str) -> Result<Vec<(String, u32)>, ImagesError> {
    // Compiled by `compile_program`: the contents staged are the binary, not the source.
    if let Some((_, dest)) = PROGRAMS.iter().find(|(source, _)| *source == input) {
        return Ok(vec![((*dest).to_owned(), 0o755)]);
    }
    match input {
        "rootfs/rc" => Ok(vec![("etc/grove/rc".to_owned(), 0o755)]),
        "rootfs/poweroff" => Ok(vec![
            ("sbin/poweroff".to_owned(), 0o755),
            ("sbin/halt".to_owned(), 0o755),
        ]),
        _ => match input.strip_prefix("rootfs/etc/") {
            Some(name) if !name.is_empty() => Ok(vec![(format!("etc/{name}"), 0o644)]),
            _ => Err(ImagesError::Unexpected(format!(
                "images/{input} is not installed anywhere in the root filesystem: \
                 map it in images/src/rootfs.rs (fn destinations) or remove it"
            ))),
        },
    }
}

/// Kind of a staged entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File(u32),
    Symlink(String),
}

/// Computes the image's contents: path (relative, no leading `/`) -> entry.
/// Committed files win over applet links of the same name.
fn plan(applets: &str, inputs: &[Input]) -> Result<BTreeMap<String, Entry>, ImagesError> {
    let mut entries = BTreeMap::new();
    for (dir, mode) in DIRS {
        entries.insert(dir.to_owned(), Entry::Dir(mode));
    }
    entries.insert("bin/busybox".to_owned(), Entry::File(0o755));
    entries.insert(agent::IMAGE_PATH.to_owned(), Entry::File(0o755));
    for input in inputs {
        for (dest, mode) in destinations(input.path)? {
            entries.insert(dest, Entry::File(mode));
        }
    }
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let valid = !applet.starts_with('/')
            && applet
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            return Err(ImagesError::Unexpected(format!(
                "busybox --list-full printed an unexpected path: {applet:?}"
            )));
        }
        if SKIPPED_APPLETS.contains(&applet) || entries.contains_key(applet) {
            continue;
        }
        let mut parent = Path::new(applet).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry::Dir(0o755));
            parent = dir.parent();
        }
        entries.insert(applet.to_owned(), Entry::Symlink("/bin/busybox".to_owned()));
    }
    Ok(entries)
}

/// Builds the root filesystem into `out` (`<cache>/rootfs/<key>`).
pub(crate) fn build(
    cache_dir: &Path,
    out: &Path,
    busybox: &PackageVersion,
    tools: &Tools,
) -> Result<(), ImagesError> {
    let started = Instant::now();
    let work = cmd::sibling(out, "work");
    cmd::remove_dir_if_exists(&work)?;
    cmd::create_dir_all(&work)?;

    let deb = apt::download(cache_dir, busybox)?;
    progress(format_args!(
        "rootfs: extracting /bin/busybox from {} {}",
        busybox.name, busybox.version
    ));
    let unpacked = work.join("deb");
    cmd::create_dir_all(&unpacked)?;
    cmd::extract_deb(
        &tools.dpkg_deb,
        &tools.tar,
        &deb,
        &unpacked,
        &["./bin/busybox"],
    )?;
    let busybox_bin = unpacked.join("bin/busybox");
    let applets = cmd::run_captured(
        Command::new(&busybox_bin).arg("--list-full"),
        "listing the busybox applets",
    )?;

    let inputs = inputs::rootfs();
    let entries = plan(&applets, &inputs)?;
    let links = entries
        .values()
        .filter(|e| matches!(e, Entry::Symlink(_)))
        .count();
    progress(format_args!(
        "rootfs: staging busybox, {links} applet links, {} committed files",
        inputs.len()
    ));
    let mut binaries = BTreeMap::new();
    for (source, dest) in PROGRAMS {
        let input = inputs
            .iter()
            .find(|i| i.path == source)
            .ok_or_else(|| ImagesError::Unexpected(format!("images/{source} is missing")))?;
        let binary = compile_program(&tools.cc, &work, source, input.contents)?;
        binaries.insert(dest.to_owned(), binary);
    }
    let agent_binary = agent::build(&tools.cargo, &work.join("grove-agent.log"))?;
    binaries.insert(agent::IMAGE_PATH.to_owned(), agent_binary);
    let root = work.join("root");
    stage(&root, &entries, &busybox_bin, &binaries, &inputs)?;

    let image = work.join(IMAGE);
    progress(format_args!(
        "rootfs: mkfs.ext4 -d ({} MiB, label {LABEL})",
        SIZE >> 20
    ));
    let file = File::create(&image).map_err(|e| ImagesError::io("create", &image, e))?;
    file.set_len(SIZE)
        .map_err(|e| ImagesError::io("size", &image, e))?;
    drop(file);
    cmd::run_captured(
        Command::new(&tools.mkfs)
            .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
            .args([
                "-q", "-F", "-T", "default", "-b", "4096", "-L", LABEL, "-U", UUID,
            ])
            .arg("-E")
            .arg(format!(
                "hash_seed={HASH_SEED},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"
            ))
            .arg("-d")
            .arg(&root)
            .arg(&image),
        "creating the root filesystem",
    )?;

    progress("rootfs: setting owner root:root and fixed times on every inode (debugfs -w)");
    fix_inodes(&tools.debugfs, &image, &work.join("debugfs.cmds"), &entries)?;
    verify(tools, &image)?;

    let tmp = cmd::sibling(out, "tmp");
    cmd::remove_dir_if_exists(&tmp)?;
    cmd::create_dir_all(&tmp)?;
    cmd::rename(&image, &tmp.join(IMAGE))?;
    cmd::rename(&tmp, out)?;
    cmd::remove_dir_if_exists(&work)?;
    progress(format_args!(
        "rootfs: built in {} -> {}",
        cmd::elapsed(started),
        out.display()
    ));
    Ok(())
}

/// Creates the staging directory and sets every file's mode and times.
fn stage(
    root: &Path,
    entries: &BTreeMap<String, Entry>,
    busybox: &Path,
    binaries: &BTreeMap<String, Vec<u8>>,
    inputs: &[Input],
) -> Result<(), ImagesError> {
    cmd::create_dir_all(root)?;
    let mut contents: BTreeMap<String, &[u8]> = BTreeMap::new();
    for input in inputs {
        for (dest, _) in destinations(input.path)? {
            contents.insert(dest, input.contents);
        }
    }
    let busybox_bytes = fs::read(busybox).map_err(|e| ImagesError::io("read", busybox, e))?;
    contents.insert("bin/busybox".to_owned(), &busybox_bytes);
    for (dest, binary) in binaries {
        contents.insert(dest.clone(), binary);
    }

    // BTreeMap order puts every directory before the paths below it.
    for (rel, entry) in entries {
        let path = root.join(rel);
        match entry {
            Entry::Dir(_) => cmd::create_dir_all(&path)?,
            Entry::File(_) => {
                let bytes = contents.get(rel).ok_or_else(|| {
                    ImagesError::Unexpected(format!("no contents for rootfs file /{rel}"))
                })?;
                cmd::write_file(&path, bytes)?;
            }
            Entry::Symlink(target) => std::os::unix::fs::symlink(target, &path)
                .map_err(|e| ImagesError::io("create symlink", &path, e))?,
        }
    }
    // Modes and times last: creating entries changes a directory's mtime.
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH);
    let times = FileTimes::new().set_accessed(epoch).set_modified(epoch);
    for (rel, entry) in entries
        .iter()
        .map(|(r, e)| (root.join(r), e))
        .chain([(root.to_owned(), &Entry::Dir(0o755))])
    {
        let mode = match entry {
            Entry::Dir(mode) | Entry::File(mode) => *mode,
            // Symlink times cannot be set through std; debugfs sets them.
            Entry::Symlink(_) => continue,
        };
        fs::set_permissions(&rel, fs::Permissions::from_mode(mode))
            .map_err(|e| ImagesError::io("set permissions of", &rel, e))?;
        File::open(&rel)
            .and_then(|file| file.set_times(times))
            .map_err(|e| ImagesError::io("set times of", &rel, e))?;
    }
    Ok(())
}

/// The debugfs batch that makes every inode owned by 0:0 with all four time
/// stamps at [`EPOCH`]: `mkfs.ext4 -d` copies the builder's uid/gid and the
/// staged files' ctime (which cannot be set on the host).
fn debugfs_script(entries: &BTreeMap<String, Entry>) -> String {
    let mut script = format!("set_current_time @{EPOCH}\n");
    let paths = std::iter::once("/".to_owned())
        .chain(std::iter::once("/lost+found".to_owned()))
        .chain(entries.keys().map(|rel| format!("/{rel}")));
    for path in paths {
        for (field, value) in [
            ("uid", "0".to_owned()),
            ("gid", "0".to_owned()),
            ("atime", format!("@{EPOCH}")),
            ("mtime", format!("@{EPOCH}")),
            ("ctime", format!("@{EPOCH}")),
            ("crtime", format!("@{EPOCH}")),
        ] {
            script.push_str(&format!("set_inode_field {path} {field} {value}\n"));
        }
    }
    script
}

/// Runs the [`debugfs_script`] on the image. debugfs exits 0 even when a
/// command fails, so anything on stderr besides its banner is an error.
fn fix_inodes(
    debugfs: &Path,
    image: &Path,
    script_path: &Path,
    entries: &BTreeMap<String, Entry>,
) -> Result<(), ImagesError> {
    cmd::write_file(script_path, debugfs_script(entries).as_bytes())?;
    let mut command = Command::new(debugfs);
    command
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .arg("-w")
        .arg("-f")
        .arg(script_path)
        .arg(image)
        .env("LC_ALL", "C");
    let output = command.output().map_err(|source| ImagesError::Spawn {
        command: cmd::describe(&command),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(ImagesError::CommandFailed {
            what: "fixing owners and times in the root filesystem".to_owned(),
            command: cmd::describe(&command),
            status: output.status,
            log: Some(script_path.to_owned()),
            output: cmd::tail(&errors.join("\n")),
        });
    }
    Ok(())
}

/// Checks the finished image: a clean fsck, and the programs owned by root.
fn verify(tools: &Tools, image: &Path) -> Result<(), ImagesError> {
    cmd::run_captured(
        Command::new(&tools.e2fsck).arg("-fn").arg(image),
        "checking the root filesystem (e2fsck -fn)",
    )?;
    for path in [
        "/sbin/init",
        "/usr/bin/grove-disktool",
        "/usr/bin/grove-agent",
        "/bin/busybox",
        "/etc/passwd",
    ] {
        let stat = cmd::run_captured(
            Command::new(&tools.debugfs)
                .arg("-R")
                .arg(format!("stat {path}"))
                .arg(image),
            "inspecting the root filesystem (debugfs stat)",
        )?;
        let owner: Vec<&str> = stat
            .lines()
            .find(|line| line.starts_with("User:"))
            .map(|line| line.split_whitespace().collect())
            .unwrap_or_default();
        // "User:     0   Group:     0   Project: ..."
        if owner.get(1) != Some(&"0") || owner.get(3) != Some(&"0") {
            return Err(ImagesError::Unexpected(format!(
                "{path} in {} is not owned by root:root after the debugfs fix-up: {}",
                image.display(),
                owner.join(" ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_files_win_over_applets() {
        let inputs = [
            Input {
                path: "rootfs/grove-init.c",
                contents: b"void grove_init(void) {}\n",
            },
            Input {
                path: "rootfs/poweroff",
                contents: b"#!/bin/sh\n",
            },
            Input {
                path: "rootfs/etc/passwd",
                contents: b"root:x:0:0::/root:/bin/sh\n",
            },
        ];
        let applets =
            "bin/sh\nsbin/init\nsbin/poweroff\nsbin/halt\nlinuxrc\nbin/busybox\nusr/local/bin/x\n";
        let entries = plan(applets, &inputs).expect("valid plan");
        assert_eq!(entries["sbin/init"], Entry::File(0o755));
        assert_eq!(entries["sbin/poweroff"], Entry::File(0o755));
        assert_eq!(entries["sbin/halt"], Entry::File(0o755));
        assert_eq!(entries["etc/passwd"], Entry::File(0o644));
        assert_eq!(entries["bin/busybox"], Entry::File(0o755));
        assert_eq!(entries["bin/sh"], Entry::Symlink("/bin/busybox".to_owned()));
        assert_eq!(entries["usr/local"], Entry::Dir(0o755));
        assert_eq!(entries["tmp"], Entry::Dir(0o1777));
        assert!(!entries.contains_key("linuxrc"));
    }

    #[test]
    fn unmapped_rootfs_input_is_an_error() {
        let inputs = [Input {
            path: "rootfs/stray",
            contents: b"",
        }];
        let error = plan("", &inputs).expect_err("unmapped input");
        assert!(error.to_string().contains("rootfs/stray"), "{error}");
    }

    #[test]
    fn rejects_escaping_applet_paths() {
        assert!(plan("../etc/x\n", &[]).is_err());
        assert!(plan("/bin/x\n", &[]).is_err());
    }

    #[test]
    fn committed_rootfs_inputs_are_all_mapped() {
        for input in inputs::rootfs() {
            destinations(input.path).expect("mapped");
        }
        assert!(inputs::rootfs()
            .iter()
            .any(|i| i.path == "rootfs/grove-init.c"));
        assert!(inputs::rootfs().iter().any(|i| i.path == "rootfs/rc"));
        for (source, dest) in PROGRAMS {
            assert!(
                inputs::rootfs().iter().any(|i| i.path == source),
                "{source}"
            );
            assert_eq!(
                destinations(source).expect("mapped"),
                vec![(dest.to_owned(), 0o755)]
            );
        }
        let entries = plan("", &inputs::rootfs()).expect("valid plan");
        assert_eq!(entries["usr/bin/grove-disktool"], Entry::File(0o755));
        assert_eq!(entries["sbin/init"], Entry::File(0o755));
        assert_eq!(entries["usr/bin/grove-agent"], Entry::File(0o755));
        assert_eq!(entries["etc/grove/hooks.d"], Entry::Dir(0o755));
    }

    /// Builds a root filesystem into a temporary directory (busybox from the shared
    /// download cache; the agent through the nested cargo, as a real build does, from
    /// inside `cargo test`) and checks what the image holds: a static grove-agent that
    /// answers a ping, the empty hooks directory, and an init that starts the agent.
    #[test]
    fn rootfs_has_static_agent_and_hooks_dir() {
        let cache = crate::default_cache_dir().expect("cache dir");
        cmd::create_dir_all(&cache).expect("cache dir");
        let busybox = apt::candidates(&cache).expect("apt candidates").busybox;
        let tools = check_tools().expect("build tools");
        let work = std::env::temp_dir().join(format!("grove-rootfs-test.{}", std::process::id()));
        cmd::remove_dir_if_exists(&work).expect("clean");
        cmd::create_dir_all(&work).expect("work dir");
        let out = work.join("rootfs");
        build(&cache, &out, &busybox, &tools).expect("rootfs builds");
        let image = out.join(IMAGE);

        let debugfs = |request: &str| {
            cmd::run_captured(
                Command::new(&tools.debugfs)
                    .arg("-R")
                    .arg(request)
                    .arg(&image),
                "debugfs",
            )
            .expect("debugfs")
        };
        let stat = debugfs("stat /usr/bin/grove-agent");
        assert!(stat.contains("Type: regular"), "{stat}");
        assert!(stat.contains("Mode:  0755"), "{stat}");
        let agent_copy = work.join("grove-agent");
        debugfs(&format!(
            "dump /usr/bin/grove-agent {}",
            agent_copy.display()
        ));
        let bytes = fs::read(&agent_copy).expect("dumped agent");
        assert_eq!(agent::is_static_elf(&bytes), Ok(true), "no PT_INTERP");

        let stat = debugfs("stat /etc/grove/hooks.d");
        assert!(stat.contains("Type: directory"), "{stat}");
        let listing = debugfs("ls -p /etc/grove/hooks.d");
        let names: Vec<&str> = listing
            .lines()
            .filter_map(|line| line.split('/').nth(5))
            .filter(|name| !name.is_empty())
            .collect();
        assert_eq!(names, [".", ".."], "empty: {listing}");

        let init_copy = work.join("init");
        debugfs(&format!("dump /sbin/init {}", init_copy.display()));
        let init = fs::read(&init_copy).expect("dumped init");
        assert!(
            init.windows(20).any(|w| w == b"/usr/bin/grove-agent"),
            "init starts the agent"
        );

        // The binary from the image runs here too (it is static): one ping over a Unix
        // socket.
        fs::set_permissions(&agent_copy, fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = work.join("agent.sock");
        let mut child = Command::new(&agent_copy)
            .arg("--listen-unix")
            .arg(&socket)
            .spawn()
            .expect("start the image's agent");
        // The socket file appears at bind(2), a moment before listen(2): retry.
        let deadline = Instant::now() + Duration::from_secs(30);
        let connected = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                result => break result,
            }
        };
        let reply = connected.and_then(|mut stream| {
            use std::io::{Read, Write};
            let ping = br#"{"v":1,"op":"ping"}"#;
            stream.write_all(&(ping.len() as u32).to_be_bytes())?;
            stream.write_all(ping)?;
            let mut len = [0u8; 4];
            stream.read_exact(&mut len)?;
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            stream.read_exact(&mut body)?;
            Ok(String::from_utf8_lossy(&body).into_owned())
        });
        let _ = child.kill();
        let _ = child.wait();
        let reply = reply.expect("ping the image's agent");
        assert!(reply.starts_with(r#"{"op":"pong","version":1,"#), "{reply}");
        cmd::remove_dir_if_exists(&work).expect("remove work dir");
    }

    /// Compiles `rootfs/grove-disktool.c` for the host with the image's flags and runs it
    /// on a regular file: bench in every mode, fsync-loop, verify (good and bad), usage.
    #[test]
    fn disktool_works_on_a_host_file() {
        let cc = cmd::require_tool("cc", "gcc").expect("a C compiler");
        // Not tmpfs if avoidable: the tool falls back from O_DIRECT there, which is fine,
        // but a real file system exercises the O_DIRECT path.
        let base = ["/var/tmp", "/tmp"]
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let work = base.join(format!("grove-disktool-test.{}", std::process::id()));
        cmd::remove_dir_if_exists(&work).expect("clean work dir");
        cmd::create_dir_all(&work).expect("work dir");
        let source = inputs::rootfs()
            .into_iter()
            .find(|i| i.path == "rootfs/grove-disktool.c")
            .expect("committed source");
        let binary = compile_program(&cc, &work, source.path, source.contents).expect("compiles");
        assert!(binary.starts_with(b"\x7fELF"));
        let tool = work.join("grove-disktool");
        let disk = work.join("disk.img");
        File::create(&disk)
            .and_then(|f| f.set_len(8 << 20))
            .expect("disk file");
        let run = |args: &[&str]| {
            let output = Command::new(&tool)
                .args(args)
                .output()
                .expect("run grove-disktool");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let disk_arg = disk.to_str().expect("UTF-8 path");

        for mode in ["seq-write", "seq-read", "rand-write", "rand-read"] {
            let (code, out, err) = run(&["bench", disk_arg, mode, "4"]);
            assert_eq!(code, Some(0), "{mode}: {err}");
            let prefix = format!("GROVE-DISKTOOL mode={mode} bytes=4194304 block=4096 seconds=");
            assert!(out.starts_with(&prefix), "{out}");
            assert!(
                out.contains(" mib_per_s=") && out.contains(" iops="),
                "{out}"
            );
            assert_eq!(out.lines().count(), 1, "{out}");
        }
        // Every 8-byte word of a bench block is 0x4756 << 48 | block index.
        let bytes = fs::read(&disk).expect("read disk");
        for (index, block) in bytes[..4 << 20].chunks(4096).enumerate() {
            let want = (0x4756u64 << 48 | index as u64).to_le_bytes();
            assert!(block.chunks(8).all(|w| w == want), "block {index}");
        }
        let (code, out, _) = run(&["bench", disk_arg, "seq-read", "8", "64"]);
        assert_eq!(code, Some(0));
        assert!(out.contains(" bytes=8388608 block=65536 "), "{out}");
        // Past the end of the file: an error, not a figure.
        let (code, out, err) = run(&["bench", disk_arg, "seq-read", "9"]);
        assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
        assert!(err.contains("device end"), "{err}");

        let (code, out, err) = run(&["fsync-loop", disk_arg, "3", "4"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, "ACK 3\nACK 4\nACK 5\nACK 6\n");
        let bytes = fs::read(&disk).expect("read disk");
        let record = &bytes[5 * 4096..6 * 4096];
        assert_eq!(&record[..32], b"GROVE-REC0000000000000005\n\n\n\n\n\n\n");
        let fill = (5u32 * 31 + 0xa5) as u8;
        assert!(record[32..].iter().all(|&b| b == fill));
        assert_eq!(run(&["verify", disk_arg, "3", "4"]).1, "VERIFY-OK 4\n");
        let (code, out, _) = run(&["verify", disk_arg, "3", "5"]);
        assert_eq!((code, out.as_str()), (Some(1), "VERIFY-BAD 7\n"));

        for bad in [
            &["bench", disk_arg, "seq-copy", "4"][..],
            &["bench", disk_arg, "seq-read", "1", "3"],
            &["bench", disk_arg, "seq-read", "x"],
            &["verify", disk_arg, "0"],
            &["fsync-loop", disk_arg, "0", "-1"],
            &[],
        ] {
            let (code, out, err) = run(bad);
            assert_eq!((code, out.as_str()), (Some(2), ""), "{bad:?}");
            assert!(err.starts_with("usage: grove-disktool ") && err.lines().count() == 1);
        }
        cmd::remove_dir_if_exists(&work).expect("remove work dir");
    }

    #[test]
    fn debugfs_script_covers_every_path() {
        let entries = plan("bin/sh\n", &[]).expect("valid plan");
        let script = debugfs_script(&entries);
        assert!(script.starts_with(&format!("set_current_time @{EPOCH}\n")));
        for path in ["/", "/lost+found", "/bin/sh", "/bin/busybox", "/tmp"] {
            assert!(script.contains(&format!("set_inode_field {path} uid 0\n")));
            assert!(script.contains(&format!("set_inode_field {path} ctime @{EPOCH}\n")));
        }
    }
}
