//! `grove-vmm --jail`: a running jailed VMM inspected through `/proc/<pid>/{status,
//! mountinfo,ns,limits,cgroup,root}`; snapshot and restore inside the jail; RLIMIT_FSIZE
//! ending the VMM with SIGXFSZ; and a failing jail step starting nothing. Needs root and
//! KVM (the test guest).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest};

mod common;
use common::TempDir;

const MEMORY_LIMIT_MIB: u64 = 256;
const NOFILE: u64 = 256;
const PIDS: u64 = 64;

/// Fails with a clear message unless this test can build jails (root) and run VMs (KVM).
fn require_root_and_kvm() {
    common::require_kvm();
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root: the jail creates namespaces, mounts and cgroups"
    );
}

/// A jailed `grove-vmm`, killed (with its whole jail, through the parent-death signal)
/// if the test ends without stopping it.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A jail for one test: its directories, ids and cgroup name.
struct Jail {
    tmp: TempDir,
    uid: u32,
    name: String,
}

impl Drop for Jail {
    /// Removes the cgroup leaf a failed test's killed VMM left (retrying while its jail's
    /// processes die of the parent-death signal).
    fn drop(&mut self) {
        let leaf = vmm::jail::cgroup::CgroupConfig {
            parent: "grove-test".into(),
            id: self.name.clone(),
            memory_bytes: None,
            cpus: None,
            pids: PIDS,
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        while vmm::jail::cgroup::Cgroup::remove_leftover(&leaf).is_err()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Jail {
    fn new(name: &str) -> Self {
        require_root_and_kvm();
        let tmp = TempDir::new(&format!("jail-{name}"));
        // Distinct per test process and test, so parallel runs never share a uid.
        let uid = 40_000 + (std::process::id() % 10_000) * 4 + name.len() as u32 % 4;
        for d in ["root", "vm"] {
            std::fs::create_dir(tmp.join(d)).unwrap();
        }
        std::os::unix::fs::chown(tmp.join("vm"), Some(uid), Some(uid)).unwrap();
        Jail {
            uid,
            name: format!("{name}-{}", std::process::id()),
            tmp,
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.join("root").canonicalize().unwrap()
    }

    fn vm(&self) -> PathBuf {
        self.tmp.join("vm").canonicalize().unwrap()
    }

    fn control(&self) -> PathBuf {
        self.vm().join("control.sock")
    }

    fn flags(&self, extra_ro: &[&Path], fsize: Option<u64>) -> Vec<String> {
        let mut f: Vec<String> = [
            "--jail",
            self.root().to_str().unwrap(),
            "--jail-uid",
            &self.uid.to_string(),
            "--jail-gid",
            &self.uid.to_string(),
            "--jail-rw",
            self.vm().to_str().unwrap(),
            "--jail-cgroup-parent",
            "grove-test",
            "--jail-cgroup-id",
            &self.name,
            "--jail-memory",
            &MEMORY_LIMIT_MIB.to_string(),
            "--jail-cpus",
            "1",
            "--jail-pids",
            &PIDS.to_string(),
            "--jail-nofile",
            &NOFILE.to_string(),
        ]
        .map(String::from)
        .into();
        for p in extra_ro {
            f.extend(["--jail-ro".into(), p.display().to_string()]);
        }
        if let Some(size) = fsize {
            f.extend(["--jail-fsize".into(), size.to_string()]);
        }
        f
    }

    /// `grove-vmm run` of the counting test guest, jailed.
    fn run(&self, fsize: Option<u64>) -> Started {
        let guest = guest();
        Started(
            Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
                .args(["run", "--kernel", guest.to_str().unwrap()])
                .args(["--memory", "32", "--no-rng", "--cmdline", "test=counter"])
                .arg("--control")
                .arg(self.control())
                .arg("--serial")
                .arg(self.vm().join("console.log"))
                .args(self.flags(&[&guest], fsize))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
}

fn guest() -> PathBuf {
    common::test_guest().canonicalize().unwrap()
}

/// Connects to the control socket once the VMM serves it; fails if `child` exits first.
fn connect(child: &mut Started, sock: &Path) -> ControlClient {
    let child = &mut child.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the jailed VMM exited ({status}) before serving its socket: {err}");
        }
        if let Ok(mut c) = ControlClient::connect(sock) {
            if matches!(c.request(Request::Status), Ok(Response::Status(_))) {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "no control socket at {sock:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The children of `pid`, from every process's stat line.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The field after the parenthesised command name: state, then ppid.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            out.push(p);
        }
    }
    out
}

/// The VMM process of a jailed `grove-vmm` started as `pid`: its grandchild (the child is
/// the PID namespace's init).
fn jailed_vmm(pid: u32) -> u32 {
    let init = children(pid);
    assert_eq!(init.len(), 1, "one init under the starter: {init:?}");
    let vmm = children(init[0]);
    assert_eq!(vmm.len(), 1, "one VMM under the init: {vmm:?}");
    vmm[0]
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Mount points (as seen from the process) and the filesystem type of its root.
fn mountinfo(pid: u32) -> (BTreeSet<String>, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut points = BTreeSet::new();
    let mut root_type = String::new();
    for line in text.lines() {
        let point = line.split(' ').nth(4).unwrap().to_string();
        let fstype = line.split(" - ").nth(1).unwrap().split(' ').next().unwrap();
        if point == "/" {
            root_type = fstype.to_string();
        }
        points.insert(point);
    }
    (points, root_type)
}

/// Every path in the tree at `root`, not descending into `mounts` (bound host paths).
fn tree(root: &Path, dir: &Path, mounts: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
        let rel = dir.join(entry.file_name());
        let abs = format!("/{}", rel.display());
        out.insert(abs.clone());
        if entry.file_type().unwrap().is_dir() && !mounts.contains(&abs) {
            tree(root, &rel, mounts, out);
        }
    }
}

/// The cgroup v1 or v2 directory of controller `c` that process `pid` is in.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let v1 = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, list, path) = (p.next()?, p.next()?, p.next()?);
        list.split(',').any(|c| c == controller).then_some(path)
    });
    let (path, mnt) = match v1 {
        Some(path) => (
            path,
            mounts.lines().find(|l| {
                let right = l.split(" - ").nth(1).unwrap();
                right.starts_with("cgroup ")
                    && right
                        .split(' ')
                        .nth(2)
                        .unwrap()
                        .split(',')
                        .any(|c| c == controller)
            }),
        ),
        None => (
            own.lines().find_map(|l| l.strip_prefix("0::")).unwrap(),
            mounts.lines().find(|l| l.contains(" - cgroup2 ")),
        ),
    };
    let mnt = mnt.unwrap().split(' ').nth(4).unwrap();
    Path::new(mnt).join(path.trim_start_matches('/'))
}

fn limit(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn stop(mut child: Started, client: &mut ControlClient) {
    let _ = client.request(Request::Shutdown);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the jailed VMM stops cleanly");
}

#[test]
fn a_running_jailed_vmm_passes_the_proc_inspection() {
    let jail = Jail::new("proc");
    // A descriptor the starter leaks (no close-on-exec) must not reach the VMM.
    let leak_path = jail.tmp.join("leaked");
    let leak = std::fs::File::create(&leak_path).unwrap();
    // SAFETY: fcntl on a descriptor `leak` owns, with integer arguments only.
    let inheritable = unsafe { libc::fcntl(leak.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(inheritable, 0);
    let mut child = jail.run(Some(1 << 30));
    drop(leak);
    let mut client = connect(&mut child, &jail.control());
    let pid = jailed_vmm(child.0.id());
    let uid = jail.uid.to_string();

    // status: unprivileged ids, no groups, no capabilities, no_new_privs.
    assert_eq!(status_field(pid, "Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(pid, "Gid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // PID 2 of its own PID namespace (the init is 1).
    assert_eq!(status_field(pid, "NSpid").split(' ').nth(1), Some("2"));

    // No inherited descriptor, no environment.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.ends_with("leaked"),
            "fd {:?} leaked in",
            fd.file_name()
        );
    }
    assert!(
        std::env::vars().count() > 0,
        "the test itself has an environment"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.iter().all(|b| *b == 0),
        "environment left in memory"
    );

    // ns: its own mount, PID and network namespaces.
    for kind in ["mnt", "pid", "net"] {
        assert_ne!(ns("self", kind), ns(&pid.to_string(), kind), "{kind}");
    }

    // mountinfo: the root is the jail's tmpfs; the only other mounts are the bound paths.
    let (points, root_type) = mountinfo(pid);
    assert_eq!(root_type, "tmpfs");
    let guest = guest().display().to_string();
    let vm = jail.vm().display().to_string();
    let mut expected: BTreeSet<String> = ["/".to_string(), guest.clone(), vm.clone()].into();
    if Path::new("/sys/module/kvm_pvm").exists() {
        expected.insert("/sys/module/kvm_pvm".into());
    }
    assert_eq!(points, expected);

    // root: nothing of the host but the bound paths, the directories leading to them and
    // /dev's three nodes; host paths outside are not there to open.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut found = BTreeSet::new();
    tree(&root, Path::new(""), &points, &mut found);
    for path in &found {
        let inside_expected = expected
            .iter()
            .any(|e| e == path || e.starts_with(&format!("{path}/")));
        let device = ["/dev", "/dev/kvm", "/dev/null", "/dev/urandom"].contains(&path.as_str());
        assert!(inside_expected || device, "unexpected {path} in the jail");
    }
    for host_path in [
        "/etc/passwd",
        "/usr",
        "/work/notes",
        "/proc/self",
        "/dev/mem",
        "/sys/fs",
    ] {
        assert!(
            !root.join(host_path.trim_start_matches('/')).exists(),
            "{host_path} is reachable from the jail"
        );
    }
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (jail.uid, 0o600));

    // limits: RLIMIT_NOFILE and RLIMIT_FSIZE, soft and hard.
    assert_eq!(limit(pid, "Max open files"), format!("{NOFILE} {NOFILE}"));
    let fsize = (1u64 << 30).to_string();
    assert_eq!(limit(pid, "Max file size"), format!("{fsize} {fsize}"));

    // cgroup: its own leaf with the limits, in every controller's hierarchy.
    let leaf = format!("grove-test/{}", jail.name);
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    let pids = cgroup_dir(pid, "pids");
    for dir in [&memory, &cpu, &pids] {
        assert!(dir.ends_with(&leaf), "{dir:?} is not the VM's cgroup");
    }
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap().trim().to_string();
    let bytes = (MEMORY_LIMIT_MIB << 20).to_string();
    if memory.join("memory.max").exists() {
        assert_eq!(read(memory.join("memory.max")), bytes);
        assert_eq!(read(cpu.join("cpu.max")), "100000 100000");
    } else {
        assert_eq!(read(memory.join("memory.limit_in_bytes")), bytes);
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "100000");
    }
    assert_eq!(read(pids.join("pids.max")), PIDS.to_string());

    stop(child, &mut client);
    // The leaf is removed with the VM; its parent stays for others.
    assert!(
        !memory.exists() && !pids.exists(),
        "cgroup leaf left behind"
    );
}

#[test]
fn snapshot_and_restore_work_jailed() {
    let jail = Jail::new("snap");
    let mut child = jail.run(None);
    let mut client = connect(&mut child, &jail.control());
    let snap = jail.vm().join("snap");
    let r = client
        .request(Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: Default::default(),
            parent: None,
            resume: true,
            mode: Default::default(),
        }))
        .unwrap();
    assert!(matches!(r, Response::Snapshot(_)), "{r:?}");
    // Written by the jail's user, in the directory it was given.
    assert_eq!(std::fs::metadata(&snap).unwrap().uid(), jail.uid);
    stop(child, &mut client);

    let restored_sock = jail.vm().join("restored.sock");
    let mut child = Started(
        Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
            .args(["restore", "--snapshot", snap.to_str().unwrap()])
            .arg("--control")
            .arg(&restored_sock)
            .arg("--serial")
            .arg(jail.vm().join("console2.log"))
            .args(jail.flags(&[&guest()], None))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut client = connect(&mut child, &restored_sock);
    let pid = jailed_vmm(child.0.id());
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    stop(child, &mut client);
}

#[test]
fn exceeding_the_file_size_limit_ends_the_vmm_with_sigxfsz() {
    let jail = Jail::new("fsize");
    // A snapshot's 32 MiB memory file cannot fit in 1 MiB.
    let mut child = jail.run(Some(1 << 20));
    let mut client = connect(&mut child, &jail.control());
    let _ = client.request(Request::Snapshot(SnapshotRequest {
        dir: jail.vm().join("snap"),
        kind: Default::default(),
        parent: None,
        resume: true,
        mode: Default::default(),
    }));
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGXFSZ), "{status}");
}

#[test]
fn killing_the_starter_ends_the_whole_jail() {
    let jail = Jail::new("kill");
    let mut child = jail.run(None);
    connect(&mut child, &jail.control());
    let init = children(child.0.id())[0];
    let vmm = jailed_vmm(child.0.id());
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{vmm}")).exists()
        || Path::new(&format!("/proc/{init}")).exists()
    {
        assert!(Instant::now() < deadline, "the jail outlived its starter");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The starter had no chance to remove the cgroup leaf; whoever started it does.
    let leaf = vmm::jail::cgroup::CgroupConfig {
        parent: "grove-test".into(),
        id: jail.name.clone(),
        memory_bytes: None,
        cpus: None,
        pids: PIDS,
    };
    vmm::jail::cgroup::Cgroup::remove_leftover(&leaf).unwrap();
    assert!(!cgroup_dir(std::process::id(), "pids")
        .join("grove-test")
        .join(&jail.name)
        .exists());
}

#[test]
fn a_failing_jail_step_starts_nothing() {
    let jail = Jail::new("fail");
    let missing = jail.vm().join("missing");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (jail.flags(&[&missing], None), "does not exist"),
        (
            jail.flags(&[Path::new("relative")], None),
            "must be absolute",
        ),
        (jail.flags(&[Path::new("/tmp/../etc")], None), "'..'"),
        (
            [jail.flags(&[], None), vec!["--jail-uid".into(), "0".into()]].concat(),
            "must not be 0",
        ),
        (
            [
                jail.flags(&[], None),
                vec!["--jail-netns".into(), "/proc/self/ns/nope".into()],
            ]
            .concat(),
            "does not exist",
        ),
        // Without the kernel in the jail the VM cannot start, but the jail itself did.
        (jail.flags(&[], None), "kernel"),
    ];
    for (flags, needle) in cases {
        let flags: Vec<String> = {
            // A repeated --jail-uid: the last one wins; drop the first pair.
            let mut f = flags;
            if f.iter().filter(|a| *a == "--jail-uid").count() > 1 {
                let i = f.iter().position(|a| a == "--jail-uid").unwrap();
                f.drain(i..i + 2);
            }
            f
        };
        let out = Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
            .args(["run", "--kernel", guest().to_str().unwrap()])
            .args(["--memory", "32", "--no-rng", "--control"])
            .arg(jail.control())
            .args(&flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{needle}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": error: ")).collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
        assert!(
            errors[0].contains(needle),
            "{:?} lacks {needle:?}",
            errors[0]
        );
        assert!(!jail.control().exists(), "a VM started: {stderr}");
    }
}

/// Runs `ip ARGS`, failing the test with its error.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("this test needs iproute2's ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Removes the named network namespace when the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_jailed_vmm_joins_its_network_namespace_and_attaches_the_tap() {
    let jail = Jail::new("net");
    let ns = Netns(format!("grove-jail-test-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // As the daemon makes it: persistent, without an owner, so the unprivileged VMM may
    // attach to it.
    ip(&[
        "-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
    ]);
    let netns = format!("/run/netns/{}", ns.0);
    let guest = guest();
    let mut child = Started(
        Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
            .args(["run", "--kernel", guest.to_str().unwrap()])
            .args(["--memory", "32", "--no-rng", "--cmdline", "test=counter"])
            .args(["--net", "tap0"])
            .arg("--control")
            .arg(jail.control())
            .args(jail.flags(&[&guest], None))
            .args(["--jail-netns", &netns])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut client = connect(&mut child, &jail.control());
    let pid = jailed_vmm(child.0.id());
    let joined = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let wanted = std::fs::metadata(&netns).unwrap();
    assert_eq!((joined.dev(), joined.ino()), (wanted.dev(), wanted.ino()));
    let tun = std::fs::metadata(format!("/proc/{pid}/root/dev/net/tun")).unwrap();
    assert_eq!(tun.mode() & 0o777, 0o666);
    stop(child, &mut client);
}
