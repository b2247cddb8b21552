//! `grove-agent`: the guest agent. Started by the default image's `/sbin/init`; listens on
//! vsock port 52 and serves each host connection on a thread of its own, started ahead of
//! time ([`agent::workers`]).
//!
//! ```text
//! grove-agent [--port N]
//! ```
//!
//! For tests on a host (not in the usage text): `--listen-unix PATH` listens on a Unix
//! socket instead of vsock, `--root DIR` puts the agent's own files (hooks directory,
//! /etc/hostname, /etc/machine-id, seed files) under DIR, and `--system` lets `identity`,
//! `reseed` and `clock` change the system they run on, which they refuse to do with
//! `--listen-unix` otherwise.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::server::Agent;
use agent::system::LinuxSystem;
use agent::vsock::VsockListener;
use agent::workers::{Dispatch, Workers};
use agent::AGENT_PORT;

/// Connections served at once; more are closed at once (a host loop gone wrong must not
/// exhaust the guest).
const MAX_CONNECTIONS: usize = 64;

/// Workers started before the agent listens and kept waiting for connections: the daemon's
/// readiness connection after a restore and one `exec` beside it start no thread.
const SPARE_WORKERS: usize = 2;

const USAGE: &str = "usage: grove-agent [--port N]";

/// Where to listen.
enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

struct Options {
    listen: Listen,
    root: PathBuf,
    system: bool,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, String> {
    let mut port = AGENT_PORT;
    let mut unix = None;
    let mut root = PathBuf::from("/");
    let mut system = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.to_str() {
            Some("--port") => {
                port = value("--port")?
                    .to_str()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a number")?;
            }
            Some("--listen-unix") => unix = Some(PathBuf::from(value("--listen-unix")?)),
            Some("--root") => root = PathBuf::from(value("--root")?),
            Some("--system") => system = true,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let listen = match unix {
        Some(path) => Listen::Unix(path),
        None => {
            // In the guest the system changes are the point.
            system = true;
            Listen::Vsock(port)
        }
    };
    Ok(Options {
        listen,
        root,
        system,
    })
}

/// Accepts connections forever, each served by a worker. Accept errors (a connection reset
/// before it was accepted, a transport reset after a restore, descriptor exhaustion) are
/// waited out: the agent must outlive them. `workers` are started before the caller
/// listens, so a connection never waits for a thread to start while spares are left.
fn serve_forever<S, F>(workers: Workers<S>, mut accept: F) -> !
where
    S: Send + 'static,
    F: FnMut() -> io::Result<S>,
{
    loop {
        let stream = match accept() {
            Ok(stream) => stream,
            Err(e) => {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN)
                ) {
                    eprintln!("grove-agent: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if let Dispatch::Failed(e) = workers.dispatch(stream) {
            eprintln!("grove-agent: cannot start a connection thread: {e}");
        }
    }
}

/// Workers serving connections with `agent`.
fn workers<S>(agent: Agent) -> Workers<S>
where
    S: io::Read + io::Write + std::os::fd::AsFd + Send + 'static,
{
    Workers::new(MAX_CONNECTIONS, SPARE_WORKERS, move |stream: S| {
        // A connection's failure is the host's business; the agent goes on.
        let _ = agent.serve(stream);
    })
}

fn main() -> ExitCode {
    let options = match parse(std::env::args_os().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("grove-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let system: Option<Box<dyn agent::system::System>> = if options.system {
        Some(Box::new(LinuxSystem))
    } else {
        None
    };
    let agent = Agent::new(options.root, system);
    // The workers start before the agent listens: a host that can connect finds them ready.
    match options.listen {
        Listen::Vsock(port) => {
            let workers = workers(agent);
            match VsockListener::bind(port) {
                Ok(listener) => serve_forever(workers, || listener.accept()),
                Err(e) => {
                    eprintln!("grove-agent: cannot listen on vsock port {port}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Listen::Unix(path) => {
            let workers = workers(agent);
            match UnixListener::bind(&path) {
                Ok(listener) => serve_forever(workers, || listener.accept().map(|(s, _)| s)),
                Err(e) => {
                    eprintln!("grove-agent: cannot listen on {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
