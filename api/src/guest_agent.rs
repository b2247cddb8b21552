//! Reaching a VM's guest agent through its vsock socket (`docs/agent-protocol.md`): the
//! blocking calls behind the supervisor's `agent_*` methods.
//!
//! Making a clone ready is one trip into the guest: the `CONNECT` line and every step
//! (entropy, clock, identity, hooks, preceded by `report_timing`) go out in one write, the
//! VMM hands the steps to the agent as soon as the guest accepts the connection, and the
//! agent answers them all in one write, each with its own handling time. Before the
//! connection closes, the VMM's control socket says how long it waited on the guest for it
//! (`vsock_connection`), which splits the rest into the host's time and the guest kernel's.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent::client::{Client, ClientError, Pipeline};
use agent::protocol::{
    ClockRequest, IdentityRequest, Request as AgentRequest, ReseedRequest,
    Response as AgentResponse, RunHooksRequest,
};

use vmm::control::client::ControlClient;
use vmm::control::protocol::{
    Request as ControlRequest, Response as ControlResponse, VsockConnectionRequest,
};

use crate::backend::{AgentError, Prepare, Prepared};
use crate::model::HookResult;

/// How long a request to a running guest's agent waits for it to answer at first.
pub(crate) const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest silence accepted on an agent connection (beyond a command's own timeout).
pub(crate) const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest silence accepted while the post-clone hooks run (the agent limits each hook).
const HOOKS_SILENCE: Duration = Duration::from_secs(3600);
/// How long the vsock handshake may take before the attempt is abandoned and made again. A
/// VMM whose device runs answers within its own 2 s limit (`docs/vsock.md`); one whose
/// guest has not set up its vsock driver yet (early in a boot) does not answer at all.
const HANDSHAKE_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(5)
};
/// The first pause before trying again to reach an agent that is not listening (yet): a
/// clone's agent listens at once, so a miss there is a moment's race.
const RETRY_FIRST: Duration = Duration::from_millis(1);
/// How long the VMM's control socket may take to give a connection's figures: they are
/// optional, and readiness does not wait long for them.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between attempts. Each attempt is a connection request the guest's
/// kernel must refuse, which costs a booting guest time under an emulated kernel; a booting
/// agent is not waited for more than this much longer than necessary.
const RETRY_MAX: Duration = Duration::from_millis(50);

/// Has the agent behind `socket` apply `prep` (waiting up to `prep.timeout` for it to
/// listen) and returns the hooks' results, the guest's own time and, when `control` (the
/// VMM's control socket) answers, how long the VMM waited on the guest for the connection.
///
/// Tried again: the handshake (refused, timed out, no socket yet: until the VMM has answered
/// `OK` it has passed nothing to the guest), and a connection that ends before the agent's
/// answer to `report_timing`, which it writes before it carries out any step. That happens
/// right after a restore: the VMM tells the guest that the transport was reset together
/// with the first connection request, and the guest may accept the connection before it
/// handles the reset, which then ends it. After that answer nothing is tried again: the
/// steps may have been applied, and post-clone hooks must not run twice.
pub(crate) fn prepare(
    socket: &Path,
    control: Option<&Path>,
    prep: &Prepare,
) -> Result<Prepared, AgentError> {
    if prep.clone.is_some() {
        // The clone's clock is set from the host's: it must make sense.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| AgentError::Unavailable(format!("host clock: {e}")))?;
    }
    // The VMM's wait on the guest for connections the guest accepted and then ended (the
    // restore's transport reset): guest time too, although no step ran.
    let mut ended_wait_us = 0u64;
    let (mut agent, pipeline) = with_retries(prep.timeout, || {
        // Built for each attempt, so that the clock sent is the time of the attempt.
        let pipeline = steps(prep).map_err(Retry::No)?;
        // Every error of the handshake is before `OK`: nothing reached the agent yet.
        let mut agent = Client::connect_uds_with(
            socket,
            agent::AGENT_PORT,
            HANDSHAKE_TIMEOUT,
            pipeline.bytes(),
        )
        .map_err(Retry::Yes)?;
        // A guest faulting its memory back in after a restore may be slow to answer;
        // giving up on a connection it has taken would risk running the steps twice.
        agent
            .set_timeout(Some(AGENT_IO_TIMEOUT))
            .map_err(Retry::No)?;
        match agent.taken() {
            Ok(()) => Ok((agent, pipeline)),
            Err(e) if e.ended_early() => {
                if let (Some(control), Some(port)) = (control, agent.host_port()) {
                    let waited = guest_wait_us(control, port).unwrap_or(0);
                    ended_wait_us = ended_wait_us.saturating_add(waited);
                }
                Err(Retry::Yes(e))
            }
            Err(e) => Err(Retry::No(e)),
        }
    })?;
    if prep.clone.is_some() {
        // Hooks may take a while each: the agent limits every one (60 s by default).
        agent
            .set_timeout(Some(HOOKS_SILENCE))
            .map_err(agent_error)?;
    }
    let answers = agent.step_answers(&pipeline).map_err(agent_error)?;
    // Asked while the connection is still open, so the VMM has it at hand (it keeps the
    // last few closed ones too) and nothing of the teardown is in the figure.
    let guest_wait_us = match (control, agent.host_port()) {
        (Some(control), Some(port)) => {
            guest_wait_us(control, port).map(|us| us.saturating_add(ended_wait_us))
        }
        _ => None,
    };
    // The agent's own figures: a guest could overstate them, which only shrinks what the
    // daemon reports as Grove's share (never below zero, see the orchestrator).
    let guest_us = answers.iter().try_fold(0u64, |sum, answer| {
        answer.handled_us.map(|us| sum.saturating_add(us))
    });
    let hooks = match answers.into_iter().last().map(|a| a.response) {
        Some(AgentResponse::Hooks { results }) => results
            .into_iter()
            .map(|h| HookResult {
                name: h.name,
                exit_code: if h.timed_out { None } else { h.code },
                output: h.output,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Prepared {
        hooks,
        guest_us,
        guest_wait_us,
    })
}

/// How long the VMM behind `control` waited on the guest for the connection with host port
/// `host_port`; `None` (logged) when it cannot say: an older VMM, one without the figures.
fn guest_wait_us(control: &Path, host_port: u32) -> Option<u64> {
    let answer =
        ControlClient::connect_with_timeout(control, Some(STATS_TIMEOUT)).and_then(|mut c| {
            c.request(ControlRequest::VsockConnection(VsockConnectionRequest {
                host_port,
            }))
        });
    match answer {
        Ok(ControlResponse::VsockConnection(info)) if info.host_port == host_port => {
            Some(info.guest_wait_us)
        }
        Ok(other) => {
            log::info!("no vsock figures for host port {host_port}: the VMM answered {other:?}");
            None
        }
        Err(e) => {
            log::info!(
                "no vsock figures for host port {host_port} from {}: {e}",
                control.display()
            );
            None
        }
    }
}

/// The readiness steps of `prep`, in order: entropy, clock (now), identity, hooks.
fn steps(prep: &Prepare) -> Result<Pipeline, ClientError> {
    let mut requests = Vec::new();
    if let Some(clone) = &prep.clone {
        // Checked by `prepare` (a host clock before 1970).
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        requests.push(AgentRequest::Reseed(ReseedRequest {
            entropy: clone.entropy.clone(),
        }));
        requests.push(AgentRequest::Clock(ClockRequest {
            unix_nanos: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        }));
    }
    requests.push(AgentRequest::Identity(IdentityRequest {
        hostname: prep.identity.hostname.clone(),
        machine_id: prep.identity.machine_id.clone(),
        address: None,
    }));
    if prep.clone.is_some() {
        requests.push(AgentRequest::RunHooks(RunHooksRequest { timeout_ms: None }));
    }
    Pipeline::new(&requests)
}

/// Connects to the agent through the VM's vsock socket and pings it, trying again while the
/// socket is missing or the agent does not answer, for at most `wait`.
pub(crate) fn connect(socket: &Path, wait: Duration) -> Result<Client<UnixStream>, AgentError> {
    with_retries(wait, || {
        Client::connect_uds(socket, agent::AGENT_PORT, AGENT_IO_TIMEOUT)
            .and_then(|mut c| c.ping().map(|_| c))
            .map_err(|e| match e {
                ClientError::Agent { .. } => Retry::No(e),
                _ => Retry::Yes(e),
            })
    })
}

/// Whether a failed attempt may be made again.
enum Retry {
    Yes(ClientError),
    No(ClientError),
}

/// Calls `attempt` until it succeeds, fails with [`Retry::No`], or `wait` has passed; the
/// pauses between attempts grow from [`RETRY_FIRST`] to [`RETRY_MAX`].
fn with_retries<T>(
    wait: Duration,
    mut attempt: impl FnMut() -> Result<T, Retry>,
) -> Result<T, AgentError> {
    let deadline = Instant::now() + wait;
    let mut pause = RETRY_FIRST;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(Retry::No(e)) => return Err(agent_error(e)),
            Err(Retry::Yes(e)) if Instant::now() >= deadline => {
                return Err(AgentError::Unavailable(format!(
                    "{e} (still, after {:.0} s)",
                    wait.as_secs_f64()
                )))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// An agent error the caller should hear about, or the agent being unreachable.
pub(crate) fn agent_error(e: ClientError) -> AgentError {
    match e.agent_error() {
        Some(info) => AgentError::Guest {
            code: serde_json::to_value(info.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "error".to_string()),
            message: info.message.clone(),
        },
        None => AgentError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
#[path = "guest_agent_tests.rs"]
mod tests;
