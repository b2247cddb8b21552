//! Running one program for `exec` and `run_hooks`: output streamed as it is read, stdin fed,
//! a time limit, and no thread besides the caller's. One `poll(2)` loop watches the output
//! pipes, the stdin pipe, a pidfd of the child (readable when it exits) and, optionally, the
//! host connection (so a host that goes away stops the program).
//!
//! Every program gets its own process group, so a timeout or a vanished host kills the
//! program and everything it started (`kill(-pgid, SIGKILL)`). A program that exits
//! normally leaves its background processes running (a command may start a service); the
//! result is reported once the program itself has exited and the output already in the
//! pipes has been read, so a background process that keeps the pipes open does not hold
//! up the answer (its later output is lost).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::{ExitStatus, ProtocolError, Stream, MAX_OUTPUT_CHUNK_BYTES};

/// Where a program's output goes, piece by piece; an error stops the program.
pub(crate) type OutputSink<'a> = dyn FnMut(Stream, &[u8]) -> Result<(), ProtocolError> + 'a;

/// Reads per output pipe once the program has exited: bounds the final drain when a
/// background process keeps writing. 64 reads of 32 KiB hold 2 MiB, more than a pipe
/// buffers even when enlarged to the unprivileged maximum (1 MiB).
const DRAIN_READS: usize = 64;

/// Why a program's run ended without an exit status to report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("cannot start the program")]
    Spawn(#[source] io::Error),
    #[error("cannot watch the program")]
    Watch(#[source] io::Error),
    #[error("cannot pass on the program's output")]
    Sink(#[source] ProtocolError),
    #[error("the host closed the connection")]
    HungUp,
}

/// A started child in its own process group; killed (group) and reaped on drop unless it
/// was reaped already.
struct Running {
    child: Child,
    pgid: libc::pid_t,
    pidfd: OwnedFd,
    reaped: bool,
}

impl Running {
    fn kill_group(&self) {
        // SAFETY: kill(2) of our child's process group; the child is not reaped yet, so its
        // pid (the group id) cannot have been reused.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }

    fn wait(&mut self) -> Result<std::process::ExitStatus, RunError> {
        let status = self.child.wait().map_err(RunError::Watch)?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

/// Sets `O_NONBLOCK` on a descriptor.
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor we hold open; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = libc::c_int::try_from(ret)
        .map_err(|_| io::Error::other("pidfd_open returned an impossible descriptor"))?;
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An output pipe being read.
struct Reader {
    stream: Stream,
    file: File,
}

/// Reads once from `reader`: `Ok(true)` while it may have more, `Ok(false)` at EOF.
fn read_once(
    reader: &mut Reader,
    buf: &mut [u8],
    sink: &mut OutputSink<'_>,
) -> Result<bool, RunError> {
    match reader.file.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            sink(reader.stream, &buf[..n]).map_err(RunError::Sink)?;
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(true)
        }
        // Any other read error ends this stream like EOF would.
        Err(_) => Ok(false),
    }
}

/// Reads what the pipes hold without waiting (after the program exited or was killed).
fn drain(
    readers: &mut [Reader],
    buf: &mut [u8],
    sink: &mut OutputSink<'_>,
) -> Result<(), RunError> {
    for reader in readers {
        for _ in 0..DRAIN_READS {
            match reader.file.read(buf) {
                Ok(0) => break,
                Ok(n) => sink(reader.stream, &buf[..n]).map_err(RunError::Sink)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    Ok(())
}

fn exit_status(status: std::process::ExitStatus, timed_out: bool) -> ExitStatus {
    ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out,
    }
}

/// Milliseconds for poll(2) until `deadline` (rounded up), `-1` without one.
fn poll_timeout(deadline: Option<Instant>, now: Instant) -> libc::c_int {
    match deadline {
        None => -1,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(now);
            let ms = left.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// Runs `command` to its end. `stdin` is written to its standard input (empty: `/dev/null`);
/// with `combine_output` stdout and stderr share one pipe (reported as [`Stream::Stdout`]),
/// so their interleaving is kept. `sink` gets the output as it is read, in pieces of at
/// most [`MAX_OUTPUT_CHUNK_BYTES`]. After `timeout` the process group is killed and the
/// status says `timed_out`. If `hangup` (the host connection) is closed by the peer, the
/// process group is killed and the result is [`RunError::HungUp`].
pub(crate) fn run(
    mut command: Command,
    stdin: &[u8],
    timeout: Option<Duration>,
    combine_output: bool,
    hangup: Option<BorrowedFd<'_>>,
    sink: &mut OutputSink<'_>,
) -> Result<ExitStatus, RunError> {
    let started = Instant::now();
    command.process_group(0);
    command.stdin(if stdin.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    });
    let mut readers = Vec::with_capacity(2);
    let mut child = if combine_output {
        let (reader, writer) = io::pipe().map_err(RunError::Spawn)?;
        let writer_too = writer.try_clone().map_err(RunError::Spawn)?;
        command.stdout(writer).stderr(writer_too);
        let child = command.spawn().map_err(RunError::Spawn)?;
        // The command holds the pipe's write ends: close ours so EOF can come.
        drop(command);
        readers.push(Reader {
            stream: Stream::Stdout,
            file: File::from(OwnedFd::from(reader)),
        });
        child
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(RunError::Spawn)?;
        if let Some(out) = child.stdout.take() {
            readers.push(Reader {
                stream: Stream::Stdout,
                file: File::from(OwnedFd::from(out)),
            });
        }
        if let Some(err) = child.stderr.take() {
            readers.push(Reader {
                stream: Stream::Stderr,
                file: File::from(OwnedFd::from(err)),
            });
        }
        child
    };
    let mut input = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    let pgid = libc::pid_t::try_from(child.id())
        .map_err(|_| RunError::Watch(io::Error::other("child pid out of range")))?;
    let pidfd = match pidfd_open(pgid) {
        Ok(fd) => fd,
        Err(e) => {
            // It cannot be watched: do not leave it running.
            // SAFETY: kill(2) of our unreaped child's process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(RunError::Watch(e));
        }
    };
    let mut running = Running {
        child,
        pgid,
        pidfd,
        reaped: false,
    };
    for fd in readers
        .iter()
        .map(|r| r.file.as_fd())
        .chain(input.iter().map(|f| f.as_fd()))
    {
        set_nonblocking(fd).map_err(RunError::Watch)?;
    }
    let deadline = timeout.and_then(|t| started.checked_add(t));
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK_BYTES];
    let mut written = 0;

    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            running.kill_group();
            let status = running.wait()?;
            drain(&mut readers, &mut buf, sink)?;
            return Ok(exit_status(status, true));
        }
        // [pidfd, readers..., stdin?, hangup?]
        let mut fds = Vec::with_capacity(5);
        let pollfd = |fd: BorrowedFd<'_>, events| libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        fds.push(pollfd(running.pidfd.as_fd(), libc::POLLIN));
        for reader in &readers {
            fds.push(pollfd(reader.file.as_fd(), libc::POLLIN));
        }
        let stdin_at = input.as_ref().map(|f| {
            fds.push(pollfd(f.as_fd(), libc::POLLOUT));
            fds.len() - 1
        });
        // Events 0: only POLLHUP/POLLERR, which poll always reports (a half-close by the
        // host, or a next request already sent, does not count as going away).
        let hangup_at = hangup.map(|fd| {
            fds.push(pollfd(fd, 0));
            fds.len() - 1
        });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                poll_timeout(deadline, now),
            )
        };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RunError::Watch(e));
        }
        if ready == 0 {
            continue;
        }
        if hangup_at.is_some_and(|i| fds[i].revents & (libc::POLLHUP | libc::POLLERR) != 0) {
            running.kill_group();
            running.wait()?;
            return Err(RunError::HungUp);
        }
        let mut open = Vec::with_capacity(readers.len());
        for (reader, fd) in readers.iter_mut().zip(&fds[1..]) {
            open.push(fd.revents == 0 || read_once(reader, &mut buf, sink)?);
        }
        let mut still_open = open.into_iter();
        readers.retain(|_| still_open.next().unwrap_or(false));
        if let (Some(i), Some(file)) = (stdin_at, input.as_mut()) {
            if fds[i].revents != 0 {
                match file.write(&stdin[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EPIPE: the program closed its stdin; it does not want the rest.
                    Err(_) => written = stdin.len(),
                }
                if written >= stdin.len() {
                    input = None;
                }
            }
        }
        if fds[0].revents != 0 {
            // Exited: report it with whatever output the pipes still hold.
            let status = running.wait()?;
            drain(&mut readers, &mut buf, sink)?;
            return Ok(exit_status(status, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(script);
        command
    }

    type Collected = Vec<(Stream, Vec<u8>)>;

    fn collect(
        command: Command,
        stdin: &[u8],
        timeout: Option<Duration>,
        combine: bool,
    ) -> (Result<ExitStatus, RunError>, Collected) {
        let mut chunks: Collected = Vec::new();
        let result = run(
            command,
            stdin,
            timeout,
            combine,
            None,
            &mut |stream, data| {
                assert!(data.len() <= MAX_OUTPUT_CHUNK_BYTES);
                match chunks.last_mut() {
                    Some((s, bytes)) if *s == stream => bytes.extend_from_slice(data),
                    _ => chunks.push((stream, data.to_vec())),
                }
                Ok(())
            },
        );
        (result, chunks)
    }

    fn joined(chunks: &Collected, stream: Stream) -> Vec<u8> {
        chunks
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, b)| b.clone())
            .collect()
    }

    #[test]
    fn streams_output_and_exit_code() {
        let (result, chunks) = collect(sh("echo out; echo err >&2; exit 3"), b"", None, false);
        let status = result.expect("ran");
        assert_eq!(
            status,
            ExitStatus {
                code: Some(3),
                signal: None,
                timed_out: false
            }
        );
        assert_eq!(joined(&chunks, Stream::Stdout), b"out\n");
        assert_eq!(joined(&chunks, Stream::Stderr), b"err\n");
    }

    #[test]
    fn feeds_large_stdin_while_reading_output() {
        // More than both pipe buffers in each direction: only works if stdin is written
        // while output is read.
        let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (result, chunks) = collect(Command::new("cat"), &input, None, false);
        assert!(result.expect("ran").success());
        assert_eq!(joined(&chunks, Stream::Stdout), input);
    }

    #[test]
    fn program_that_ignores_stdin_is_fine() {
        let (result, chunks) = collect(sh("exec 0<&-; echo closed"), &[1; 200_000], None, false);
        assert!(result.expect("ran").success());
        assert_eq!(joined(&chunks, Stream::Stdout), b"closed\n");
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let started = Instant::now();
        // The background sleep would keep the pipes open for 30 s if it survived.
        let (result, chunks) = collect(
            sh("echo before; sleep 30 & sleep 30; echo never"),
            b"",
            Some(Duration::from_millis(300)),
            false,
        );
        let status = result.expect("ran");
        assert!(status.timed_out, "{status:?}");
        assert_eq!(status.signal, Some(libc::SIGKILL));
        assert_eq!(status.code, None);
        assert_eq!(joined(&chunks, Stream::Stdout), b"before\n");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn exit_is_reported_although_a_background_process_holds_the_pipes() {
        let started = Instant::now();
        let (result, chunks) = collect(sh("sleep 5 & echo done"), b"", None, false);
        assert_eq!(result.expect("ran").code, Some(0));
        assert_eq!(joined(&chunks, Stream::Stdout), b"done\n");
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn combined_output_keeps_the_order() {
        let (result, chunks) = collect(
            sh("echo 1; echo 2 >&2; echo 3; echo 4 >&2"),
            b"",
            None,
            true,
        );
        assert!(result.expect("ran").success());
        assert_eq!(chunks.len(), 1);
        assert_eq!(joined(&chunks, Stream::Stdout), b"1\n2\n3\n4\n");
    }

    #[test]
    fn signal_is_reported() {
        let (result, _) = collect(sh("kill -TERM $$"), b"", None, false);
        let status = result.expect("ran");
        assert_eq!((status.code, status.signal), (None, Some(libc::SIGTERM)));
        assert!(!status.timed_out);
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let (result, _) = collect(
            Command::new("/nonexistent/grove-no-such-program"),
            b"",
            None,
            false,
        );
        assert!(matches!(result, Err(RunError::Spawn(_))), "{result:?}");
    }

    #[test]
    fn failing_sink_kills_the_program() {
        let started = Instant::now();
        let result = run(
            sh("echo x; sleep 30"),
            b"",
            None,
            false,
            None,
            &mut |_, _| Err(ProtocolError::Io(io::ErrorKind::BrokenPipe.into())),
        );
        assert!(matches!(result, Err(RunError::Sink(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn closed_connection_kills_the_program() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(theirs);
        });
        let started = Instant::now();
        let result = run(
            sh("sleep 30"),
            b"",
            None,
            false,
            Some(ours.as_fd()),
            &mut |_, _| Ok(()),
        );
        closer.join().expect("closer");
        assert!(matches!(result, Err(RunError::HungUp)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
