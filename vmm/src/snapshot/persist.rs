//! The one way every stateful component saves and restores itself.

/// A component whose complete state can be captured as plain data and rebuilt from it.
///
/// `State` is plain serde data: no file descriptors, no `Arc`s, no KVM types that the
/// snapshot format does not own. There is deliberately no default implementation: a
/// component that forgets to persist something must fail to compile, not silently
/// restore empty (Cloud Hypervisor's no-op default is the trap this avoids).
pub trait Persist: Sized {
    /// The saved state.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What restoring needs besides the state (guest memory, the VM fd, host paths, ...).
    type RestoreArgs;
    /// Why a restore failed.
    type Error: std::error::Error;

    /// Captures the state. Called only while the VM is paused.
    fn save(&self) -> Self::State;

    /// Rebuilds the component from `state`. Must validate everything it takes from the state
    /// (it comes from a file) and never panic on bad values.
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
