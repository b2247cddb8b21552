//! One function per request. Each checks its arguments before it changes anything, and
//! turns every failure into an `error` response that names the step and the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::process::{self, RunError};
use super::{describe, hooks, Agent};
use crate::protocol::{
    ClockRequest, ErrorCode, ExecRequest, HookResult, IdentityRequest, ProtocolError,
    ReadFileRequest, ReseedRequest, Response, RunHooksRequest, WriteFileRequest,
    DEFAULT_HOOK_TIMEOUT_MS, MAX_ENTROPY_BYTES, MAX_FILE_BYTES, MAX_FRAME_BYTES,
};
use crate::system::System;

/// The interface `identity` addresses.
pub(crate) const INTERFACE: &str = "eth0";
/// The host name file, relative to the agent's root.
pub(crate) const HOSTNAME_FILE: &str = "etc/hostname";
/// The machine-id file, relative to the agent's root.
pub(crate) const MACHINE_ID_FILE: &str = "etc/machine-id";
/// Userspace random seed files that `reseed` rewrites if they exist (systemd, Debian's
/// `urandom` init script, OpenRC/others), relative to the agent's root. A clone must not
/// save or credit the seed it shares with its source.
pub(crate) const SEED_FILES: [&str; 3] = [
    "var/lib/systemd/random-seed",
    "var/lib/urandom/random-seed",
    "var/lib/random-seed",
];
/// Size of a rewritten seed file that was empty (an existing size is kept, up to 4 KiB).
const DEFAULT_SEED_BYTES: u64 = 512;
const MAX_SEED_BYTES: u64 = 4096;

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::error(code, message)
}

/// An error response for a failed I/O step on `path`.
fn io_error(what: &str, path: &Path, e: &io::Error) -> Response {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    error(code, format!("cannot {what} {}: {e}", path.display()))
}

fn absolute(path: &str) -> Result<&Path, Response> {
    let path = Path::new(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(error(
            ErrorCode::InvalidArgument,
            format!("path {} is not absolute", path.display()),
        ))
    }
}

/// `exec`: output frames as the program writes, then its exit status.
pub(super) fn exec(
    request: &ExecRequest,
    hangup: Option<BorrowedFd<'_>>,
    reply: &mut dyn FnMut(&Response) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    let Some(program) = request.argv.first().filter(|p| !p.is_empty()) else {
        return reply(&error(
            ErrorCode::InvalidArgument,
            "argv must name a program",
        ));
    };
    let mut command = Command::new(program);
    command
        .args(&request.argv[1..])
        .envs(&request.env)
        .current_dir(request.cwd.as_deref().unwrap_or("/"));
    let timeout = request.timeout_ms.map(Duration::from_millis);
    let result = process::run(
        command,
        &request.stdin,
        timeout,
        false,
        hangup,
        &mut |stream, data| {
            reply(&Response::Output {
                stream,
                data: data.to_vec(),
            })
        },
    );
    match result {
        Ok(status) => reply(&Response::Exit(status)),
        Err(RunError::Spawn(e)) => {
            let cwd = request.cwd.as_deref().unwrap_or("/");
            reply(&error(
                ErrorCode::SpawnFailed,
                format!("cannot run {program:?} in {cwd}: {e}"),
            ))
        }
        Err(error @ RunError::Watch(_)) => reply(&Response::error(ErrorCode::Io, describe(&error))),
        Err(RunError::Sink(e)) => Err(e),
        Err(RunError::HungUp) => Err(ProtocolError::Io(io::ErrorKind::ConnectionAborted.into())),
    }
}

/// `read_file`: the whole file, at most [`MAX_FILE_BYTES`].
pub(super) fn read_file(request: &ReadFileRequest) -> Response {
    let path = match absolute(&request.path) {
        Ok(path) => path,
        Err(response) => return response,
    };
    let read = || -> io::Result<Option<Vec<u8>>> {
        let file = File::open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        // Sizes of /proc and /sys files are not known in advance: read one byte past the
        // limit to find out.
        let mut data = Vec::new();
        file.take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut data)?;
        Ok((data.len() <= MAX_FILE_BYTES).then_some(data))
    };
    match read() {
        Ok(Some(data)) => Response::File { data },
        Ok(None) => error(
            ErrorCode::TooLarge,
            format!(
                "{} is larger than {MAX_FILE_BYTES} bytes, the limit of read_file; \
                 read it in parts with exec",
                path.display()
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => error(
            ErrorCode::InvalidArgument,
            format!("cannot read {}: {e}", path.display()),
        ),
        Err(e) => io_error("read", path, &e),
    }
}

/// `write_file`: create or truncate, write, set the mode if one is given.
pub(super) fn write_file(request: &WriteFileRequest) -> Response {
    let path = match absolute(&request.path) {
        Ok(path) => path,
        Err(response) => return response,
    };
    if request.mode.is_some_and(|mode| mode > 0o7777) {
        return error(
            ErrorCode::InvalidArgument,
            format!("mode {:o} has bits beyond 07777", request.mode.unwrap_or(0)),
        );
    }
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(request.mode.unwrap_or(0o644))
            .open(path)?;
        file.write_all(&request.data)?;
        if let Some(mode) = request.mode {
            // The open mode applies only to a new file, and is masked by the umask.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    match write() {
        Ok(()) => Response::Ok {},
        Err(e) => io_error("write", path, &e),
    }
}

/// Whether `name` is a host name `identity` accepts.
fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether `id` is a machine-id: 32 lowercase hex digits, not all zero.
fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0')
}

/// Parses `a.b.c.d/prefix`.
fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((address.parse().ok()?, prefix))
}

fn require_system(agent: &Agent) -> Result<&dyn System, Response> {
    agent.system().ok_or_else(|| {
        error(
            ErrorCode::Unsupported,
            "this agent was started without system changes (--listen-unix without --system): \
             identity, reseed and clock are refused",
        )
    })
}

/// Writes `contents` to the file at `root/relative`.
fn write_under(root: &Path, relative: &str, contents: &[u8]) -> Result<(), Response> {
    let path = root.join(relative);
    fs::write(&path, contents).map_err(|e| io_error("write", &path, &e))
}

/// `identity`: host name, `/etc/hostname`, `/etc/machine-id`, then the address.
pub(super) fn identity(agent: &Agent, request: &IdentityRequest) -> Response {
    let result = (|| {
        if !valid_hostname(&request.hostname) {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "hostname {:?} is not 1-64 characters of A-Z a-z 0-9 - . \
                     starting with a letter or digit",
                    request.hostname
                ),
            ));
        }
        if !valid_machine_id(&request.machine_id) {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "machine_id {:?} is not 32 lowercase hex digits (not all zero)",
                    request.machine_id
                ),
            ));
        }
        let address = match &request.address {
            None => None,
            Some(address) => {
                let (ip, prefix) = parse_cidr(&address.cidr).ok_or_else(|| {
                    error(
                        ErrorCode::InvalidArgument,
                        format!("cidr {:?} is not an IPv4 address/prefix", address.cidr),
                    )
                })?;
                let gateway: Ipv4Addr = address.gateway.parse().map_err(|_| {
                    error(
                        ErrorCode::InvalidArgument,
                        format!("gateway {:?} is not an IPv4 address", address.gateway),
                    )
                })?;
                Some((ip, prefix, gateway))
            }
        };
        let system = require_system(agent)?;
        system
            .set_hostname(&request.hostname)
            .map_err(|e| io_error("set the host name to", Path::new(&request.hostname), &e))?;
        write_under(
            agent.root(),
            HOSTNAME_FILE,
            format!("{}\n", request.hostname).as_bytes(),
        )?;
        write_under(
            agent.root(),
            MACHINE_ID_FILE,
            format!("{}\n", request.machine_id).as_bytes(),
        )?;
        if let Some((ip, prefix, gateway)) = address {
            system
                .set_address(INTERFACE, ip, prefix, gateway)
                .map_err(|e| {
                    error(
                        ErrorCode::Io,
                        format!(
                            "cannot give {INTERFACE} the address {ip}/{prefix} via {gateway}: {e}"
                        ),
                    )
                })?;
        }
        Ok(Response::Ok {})
    })();
    result.unwrap_or_else(|response| response)
}

/// `n` bytes from the kernel's random number generator.
fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled, writable part of `bytes`.
        let got = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += got as usize;
        }
    }
    Ok(bytes)
}

/// `reseed`: credit the host's entropy and reseed the kernel RNG, then rewrite every
/// userspace seed file that exists with fresh bytes from the reseeded kernel.
pub(super) fn reseed(agent: &Agent, request: &ReseedRequest) -> Response {
    let result = (|| {
        let n = request.entropy.len();
        if n == 0 || n > MAX_ENTROPY_BYTES {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!("entropy has {n} bytes; send 1 to {MAX_ENTROPY_BYTES}"),
            ));
        }
        let system = require_system(agent)?;
        system.add_entropy(&request.entropy).map_err(|e| {
            let code = match e.kind() {
                io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                _ => ErrorCode::Io,
            };
            error(code, format!("cannot add entropy to the kernel pool: {e}"))
        })?;
        for relative in SEED_FILES {
            let path = agent.root().join(relative);
            let len = match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => match meta.len() {
                    0 => DEFAULT_SEED_BYTES,
                    len => len.min(MAX_SEED_BYTES),
                },
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("inspect", &path, &e)),
            };
            // Bounded by MAX_SEED_BYTES above.
            let seed =
                random_bytes(len as usize).map_err(|e| io_error("make a seed for", &path, &e))?;
            fs::write(&path, seed).map_err(|e| io_error("rewrite", &path, &e))?;
        }
        Ok(Response::Ok {})
    })();
    result.unwrap_or_else(|response| response)
}

/// `clock`: set `CLOCK_REALTIME`.
pub(super) fn clock(agent: &Agent, request: &ClockRequest) -> Response {
    let system = match require_system(agent) {
        Ok(system) => system,
        Err(response) => return response,
    };
    match system.set_clock(request.unix_nanos) {
        Ok(()) => Response::Ok {},
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                io::ErrorKind::InvalidInput => ErrorCode::InvalidArgument,
                _ => ErrorCode::Io,
            };
            error(code, format!("cannot set the clock: {e}"))
        }
    }
}

/// `run_hooks`: every hook, each result; outputs shortened if the report would not fit in
/// one frame.
pub(super) fn run_hooks(agent: &Agent, request: &RunHooksRequest) -> Response {
    let timeout = Duration::from_millis(request.timeout_ms.unwrap_or(DEFAULT_HOOK_TIMEOUT_MS));
    match hooks::run_all(&agent.hooks_dir(), timeout) {
        Ok(results) => fit_hooks(results),
        Err(e) => error(ErrorCode::Io, describe(&e)),
    }
}

/// The `hooks` response, with every output cut to a shorter tail until it fits in a frame.
fn fit_hooks(mut results: Vec<HookResult>) -> Response {
    /// Serialises exactly like `Response::Hooks`, without owning the results.
    #[derive(serde::Serialize)]
    struct HooksFrame<'a> {
        op: &'static str,
        results: &'a [HookResult],
    }
    loop {
        let frame = HooksFrame {
            op: "hooks",
            results: &results,
        };
        let fits = serde_json::to_vec(&frame).is_ok_and(|body| body.len() <= MAX_FRAME_BYTES);
        let longest = results.iter().map(|r| r.output.len()).max().unwrap_or(0);
        if fits || longest == 0 {
            return Response::Hooks { results };
        }
        for result in &mut results {
            let keep = result.output.len() / 2;
            let mut start = result.output.len() - keep;
            while !result.output.is_char_boundary(start) {
                start += 1;
            }
            result.output.drain(..start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["grove", "feature-x", "a", "web-1.branch", &"x".repeat(64)] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in ["", "-x", ".x", "a b", "a_b", "ä", &"x".repeat(65), "a/b"] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn machine_ids() {
        assert!(valid_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_machine_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_machine_id("0123456789abcdef0123456789abcde"));
        assert!(!valid_machine_id(&"0".repeat(32)));
        assert!(!valid_machine_id("0123456789abcdef0123456789abcdeg"));
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("172.16.0.2/30"),
            Some((Ipv4Addr::new(172, 16, 0, 2), 30))
        );
        assert_eq!(parse_cidr("0.0.0.0/0"), Some((Ipv4Addr::UNSPECIFIED, 0)));
        for bad in [
            "172.16.0.2",
            "172.16.0.2/33",
            "172.16.0/24",
            "::1/64",
            "a/8",
            "1.2.3.4/",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn hook_reports_are_shortened_to_fit_a_frame() {
        let results: Vec<HookResult> = (0..200)
            .map(|i| HookResult {
                name: format!("{i:03}-hook"),
                code: Some(0),
                signal: None,
                timed_out: false,
                // Control characters take 6 bytes each in JSON.
                output: "é\u{1}".repeat(2000),
            })
            .collect();
        let Response::Hooks { results } = fit_hooks(results) else {
            panic!("not a hooks response");
        };
        assert_eq!(results.len(), 200);
        let body = serde_json::to_vec(&Response::Hooks {
            results: results.clone(),
        })
        .expect("encode");
        assert!(body.len() <= MAX_FRAME_BYTES);
        assert!(results[0].output.ends_with("é\u{1}"));
        assert!(!results[0].output.is_empty());
    }

    #[test]
    fn random_bytes_differ() {
        let a = random_bytes(64).expect("random");
        let b = random_bytes(64).expect("random");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
