//! Running external programs, finding tools, small file helpers.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::ImagesError;

/// How many trailing output lines a failure message quotes.
const TAIL_LINES: usize = 25;
/// How often a long-running logged step prints a progress line.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Prints one progress line to stderr.
pub(crate) fn progress(message: impl std::fmt::Display) {
    eprintln!("grove-images: {message}");
}

/// Looks for an executable in `PATH`, then in `/usr/sbin` and `/sbin` (which
/// are often missing from a normal user's `PATH` but hold mkfs.ext4 and debugfs).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A required tool: resolves it or names the Debian package to install.
pub(crate) fn require_tool(
    tool: &'static str,
    package: &'static str,
) -> Result<PathBuf, ImagesError> {
    find_tool(tool).ok_or(ImagesError::MissingTool { tool, package })
}

/// A required file (header, library) from a Debian package.
pub(crate) fn require_file(path: &str, package: &'static str) -> Result<(), ImagesError> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(ImagesError::MissingFile {
            path: PathBuf::from(path),
            package,
        })
    }
}

/// A command line as text, for messages.
pub(crate) fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last [`TAIL_LINES`] lines of `text`.
pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Runs a command to completion, capturing its output (C locale). Returns
/// stdout; on failure the error quotes the end of its stdout and stderr.
pub(crate) fn run_captured(command: &mut Command, what: &str) -> Result<String, ImagesError> {
    command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = command.output().map_err(|source| ImagesError::Spawn {
        command: describe(command),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let shown = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    Err(ImagesError::CommandFailed {
        what: what.to_owned(),
        command: describe(command),
        status: output.status,
        log: None,
        output: tail(&shown),
    })
}

/// Runs a command to completion with stdout and stderr appended to `log`
/// (C locale). On failure the error names the log and quotes its end.
pub(crate) fn run_logged(command: &mut Command, what: &str, log: &Path) -> Result<(), ImagesError> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ImagesError::io("create log file", log, e))?;
    let file_err = file
        .try_clone()
        .map_err(|e| ImagesError::io("duplicate handle of log file", log, e))?;
    command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file_err));
    let mut child = command.spawn().map_err(|source| ImagesError::Spawn {
        command: describe(command),
        source,
    })?;
    // Long steps (the kernel compile takes minutes) report signs of life.
    let started = Instant::now();
    let mut last_report = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(ImagesError::Spawn {
                    command: describe(command),
                    source,
                })
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() >= HEARTBEAT {
            last_report = Instant::now();
            let last_line = read_tail(log)
                .ok()
                .and_then(|text| {
                    text.lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            progress(format_args!(
                "  ... {what}: {} so far; log: {}",
                elapsed(started),
                last_line.trim()
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    Err(ImagesError::CommandFailed {
        what: what.to_owned(),
        command: describe(command),
        status,
        log: Some(log.to_owned()),
        output: tail(&read_tail(log).unwrap_or_default()),
    })
}

/// The last 64 KiB of a file, as text.
fn read_tail(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Extracts `members` (tar member names such as `./bin/busybox`, or all
/// members if empty) of a .deb's data archive into `dest`:
/// `dpkg-deb --fsys-tarfile <deb> | tar -x -C <dest> <members>`.
pub(crate) fn extract_deb(
    dpkg_deb: &Path,
    tar: &Path,
    deb: &Path,
    dest: &Path,
    members: &[&str],
) -> Result<(), ImagesError> {
    let mut producer_command = Command::new(dpkg_deb);
    producer_command
        .arg("--fsys-tarfile")
        .arg(deb)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut producer = producer_command
        .spawn()
        .map_err(|source| ImagesError::Spawn {
            command: describe(&producer_command),
            source,
        })?;
    let pipe = producer.stdout.take().ok_or_else(|| {
        ImagesError::Unexpected("dpkg-deb started without an output pipe".to_owned())
    })?;
    let mut consumer = Command::new(tar);
    consumer
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .args(members)
        .stdin(Stdio::from(pipe));
    let consumer_command = describe(&consumer);
    let consumer_output = consumer
        .env("LC_ALL", "C")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    // Always reap dpkg-deb, even if tar could not be started.
    let producer_output = producer
        .wait_with_output()
        .map_err(|source| ImagesError::Spawn {
            command: describe(&producer_command),
            source,
        })?;
    let consumer_output = consumer_output.map_err(|source| ImagesError::Spawn {
        command: consumer_command.clone(),
        source,
    })?;
    if !producer_output.status.success() {
        return Err(ImagesError::CommandFailed {
            what: format!("unpacking {}", deb.display()),
            command: describe(&producer_command),
            status: producer_output.status,
            log: None,
            output: tail(&String::from_utf8_lossy(&producer_output.stderr)),
        });
    }
    if !consumer_output.status.success() {
        return Err(ImagesError::CommandFailed {
            what: format!("unpacking {}", deb.display()),
            command: consumer_command,
            status: consumer_output.status,
            log: None,
            output: tail(&String::from_utf8_lossy(&consumer_output.stderr)),
        });
    }
    Ok(())
}

/// Removes a directory tree if it exists.
pub(crate) fn remove_dir_if_exists(path: &Path) -> Result<(), ImagesError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(ImagesError::io("remove directory", path, e))
        }
        _ => Ok(()),
    }
}

/// Creates a directory and its parents.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), ImagesError> {
    fs::create_dir_all(path).map_err(|e| ImagesError::io("create directory", path, e))
}

/// Renames `from` to `to` (atomic within one file system).
pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), ImagesError> {
    fs::rename(from, to).map_err(|e| ImagesError::io("rename into place", to, e))
}

/// Writes a file.
pub(crate) fn write_file(path: &Path, contents: &[u8]) -> Result<(), ImagesError> {
    fs::write(path, contents).map_err(|e| ImagesError::io("write", path, e))
}

/// `<dir>.<suffix>` next to `dir`.
pub(crate) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

/// Human-readable duration, e.g. `3m52s` or `0.4s`.
pub(crate) fn elapsed(since: Instant) -> String {
    let secs = since.elapsed().as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    }
}

/// The host C compiler's identity, `cc --version`'s first line (for example
/// "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"), as a build input.
pub(crate) fn toolchain_version() -> Result<crate::key::PackageVersion, ImagesError> {
    let cc = require_tool("cc", "gcc")?;
    let out = run_captured(
        Command::new(cc).arg("--version"),
        "asking the C compiler its version",
    )?;
    Ok(crate::key::PackageVersion {
        name: "cc",
        version: out.lines().next().unwrap_or_default().trim().to_owned(),
    })
}
