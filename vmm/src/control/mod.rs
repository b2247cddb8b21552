//! The control socket of a `grove-vmm` process (`--control PATH`): a Unix socket speaking
//! length-prefixed JSON ([`protocol`]), served on the VMM's event loop ([`server`]), with a
//! blocking [`client`] for tests and the daemon.

pub mod client;
pub mod protocol;
pub mod server;

#[cfg(test)]
mod tests;

/// What the server calls for each well-formed request. Implemented by the running VMM;
/// tests use a mock. Runs on the event-loop thread: device processing is stopped while a
/// request is handled, which is what makes a snapshot consistent.
pub trait ControlHandler: Send + Sync {
    fn handle(&self, request: protocol::Request) -> protocol::Response;
}
