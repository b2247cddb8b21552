//! `cargo demo`: the main job on a fresh Debian host. Installs the host packages (when run
//! as root), builds the default images if they are not cached, builds `grove-vmm`, `groved`
//! and `grove`, starts the daemon on a private data directory, boots the environment `main`
//! from the default image, writes a file in it, branches `feature-x` from the running `main`,
//! and shows both running with the same data. Every step is a `grove` command, printed before
//! it runs.
//!
//! On a terminal it then waits for Enter (try the printed `grove` commands meanwhile);
//! otherwise, or after Enter, it deletes both environments and stops the daemon.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use grove_integration::{build_release_bins, ensure_host_packages};

/// How long the guest may take to boot here (emulated kernel mode: tens of seconds).
const BOOT_WAIT: Duration = Duration::from_secs(300);

struct Demo {
    grove: PathBuf,
    socket: PathBuf,
}

impl Demo {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.grove);
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    /// Runs `grove ARGS`, showing the command and its output.
    fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("\n$ grove {}", args.join(" "));
        let status = self.command(args).status()?;
        if !status.success() {
            bail!("grove {} failed ({status})", args.join(" "));
        }
        Ok(())
    }

    /// The environment's console so far.
    fn console(&self, env: &str) -> anyhow::Result<String> {
        let out = self.command(&["console", env]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_console(&self, env: &str, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console(env)?;
            if let Some(line) = text
                .lines()
                .find(|l| l.contains(needle) && !l.contains("echo"))
            {
                return Ok(line.trim().to_string());
            }
            if Instant::now() > deadline {
                bail!("{env}: no {needle:?} on the console within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn type_line(&self, env: &str, line: &str) -> anyhow::Result<()> {
        println!("\n$ grove type {env} '{line}'");
        let status = self.command(&["type", env, line]).status()?;
        if !status.success() {
            bail!("grove type {env} failed");
        }
        Ok(())
    }
}

fn start_daemon(bins: &Path, data: &Path, socket: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(data.with_extension("log"))?;
    let child = Command::new(bins.join("groved"))
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(socket)
        .env("GROVE_VMM_BIN", bins.join("grove-vmm"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start groved")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "groved did not start; see {}",
                data.with_extension("log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn run(demo: &Demo, images: &grove_images::ImageSet) -> anyhow::Result<()> {
    let kernel = images.vmlinux.to_string_lossy().into_owned();
    let rootfs = images.rootfs.to_string_lossy().into_owned();
    demo.show(&[
        "image", "add", "default", "--kernel", &kernel, "--rootfs", &rootfs,
    ])?;
    demo.show(&["create", "main", "--image", "default"])?;
    println!("\n(waiting for main's guest to boot; under nested KVM this takes a while)");
    demo.wait_console("main", "GROVE-INIT-READY", BOOT_WAIT)?;
    demo.type_line(
        "main",
        "echo \"written in main at uptime $(cut -d. -f1 /proc/uptime)s\" > /data.txt; sync; echo DEMO-$((40+2))",
    )?;
    demo.wait_console("main", "DEMO-42", BOOT_WAIT)?;
    demo.show(&["branch", "feature-x", "--from", "main"])?;
    demo.show(&["ls"])?;
    demo.type_line("main", "echo MAIN-SEES: $(cat /data.txt)")?;
    demo.type_line("feature-x", "echo FEATURE-X-SEES: $(cat /data.txt)")?;
    let main = demo.wait_console("main", "MAIN-SEES:", BOOT_WAIT)?;
    let feature = demo.wait_console("feature-x", "FEATURE-X-SEES:", BOOT_WAIT)?;
    println!("\nmain's console:      {main}");
    println!("feature-x's console: {feature}");
    let same =
        main.trim_start_matches("MAIN-SEES:") == feature.trim_start_matches("FEATURE-X-SEES:");
    println!(
        "{}",
        if same {
            "both environments are running with identical data"
        } else {
            "the data differs (unexpected)"
        }
    );
    if !same {
        bail!("feature-x does not see main's data");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    ensure_host_packages("demo")?;
    let cache = grove_images::default_cache_dir()?;
    let images = grove_images::build_default(&cache).context("building the default images")?;
    let bins = build_release_bins(&[
        ("vmm", "grove-vmm"),
        ("grove-api", "groved"),
        ("grove-api", "grove"),
    ])?;
    let work = std::env::temp_dir().join(format!("grove-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let data = work.join("data");
    let socket = work.join("groved.sock");
    let mut daemon = start_daemon(&bins, &data, &socket)?;
    let demo = Demo {
        grove: bins.join("grove"),
        socket: socket.clone(),
    };
    println!(
        "groved is running (data {}, socket {})",
        data.display(),
        socket.display()
    );
    let result = run(&demo, &images);
    if result.is_ok() && std::io::stdin().is_terminal() {
        println!(
            "\nTry, in another terminal:\n  {grove} --socket {sock} ls\n  {grove} --socket {sock} type feature-x 'echo hi > /data.txt'\n  {grove} --socket {sock} console feature-x --follow\n\nPress Enter to delete both environments and stop.",
            grove = demo.grove.display(),
            sock = socket.display()
        );
        let _ = std::io::stdin().lock().read_line(&mut String::new());
    }
    for env in ["feature-x", "main"] {
        let _ = demo.command(&["rm", env, "--force"]).status();
    }
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&work);
    result
}
