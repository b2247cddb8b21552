//! `grove-agent`: the guest agent. Started by the default image's `/sbin/init`; listens on
//! vsock port 52 and serves each host connection on its own thread.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::server::Agent;
use agent::system::LinuxSystem;
use agent::vsock::VsockListener;
use agent::AGENT_PORT;

/// Connections served at once; more are closed at once (a host loop gone wrong must not
/// exhaust the guest).
const MAX_CONNECTIONS: usize = 64;

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

/// Counts a connection for as long as it lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections forever, each served on its own thread. Accept errors (a connection
/// reset before it was accepted, a transport reset after a restore, descriptor exhaustion)
/// are waited out: the agent must outlive them.
fn serve_forever<S, F>(agent: Agent, mut accept: F) -> !
where
    S: io::Read + io::Write + std::os::fd::AsFd + Send + 'static,
    F: FnMut() -> io::Result<S>,
{
    let agent = Arc::new(agent);
    let active = Arc::new(AtomicUsize::new(0));
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
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let slot = Slot(Arc::clone(&active));
        let agent = Arc::clone(&agent);
        let spawned = std::thread::Builder::new()
            .name("connection".to_owned())
            .spawn(move || {
                let _slot = slot;
                // A connection's failure is the host's business; the agent goes on.
                let _ = agent.serve(stream);
            });
        if let Err(e) = spawned {
            eprintln!("grove-agent: cannot start a connection thread: {e}");
        }
    }
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
    match options.listen {
        Listen::Vsock(port) => match VsockListener::bind(port) {
            Ok(listener) => serve_forever(agent, || listener.accept()),
            Err(e) => {
                eprintln!("grove-agent: cannot listen on vsock port {port}: {e}");
                ExitCode::FAILURE
            }
        },
        Listen::Unix(path) => match UnixListener::bind(&path) {
            Ok(listener) => serve_forever(agent, || listener.accept().map(|(s, _)| s)),
            Err(e) => {
                eprintln!("grove-agent: cannot listen on {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
    }
}
