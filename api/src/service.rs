//! The seam between the HTTP layer and the orchestrator: everything the API can do, with no
//! HTTP types. The daemon implements it with [`crate::orchestrator::Orchestrator`]; the HTTP
//! tests with a fake.

use std::future::Future;

use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::model::{
    CreateEnvironment, CreateImage, Environment, EnvironmentCreated, Event, ExecRequest,
    ExecResult, Image, Snapshot, SnapshotMode,
};

pub type Result<T> = std::result::Result<T, ApiError>;

/// What the API offers. Names arrive unvalidated; implementations validate them.
pub trait Service: Send + Sync + 'static {
    fn list_images(&self) -> impl Future<Output = Result<Vec<Image>>> + Send;
    fn create_image(&self, req: CreateImage) -> impl Future<Output = Result<Image>> + Send;
    fn get_image(&self, name: &str) -> impl Future<Output = Result<Image>> + Send;
    fn delete_image(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every environment; parents before children.
    fn list_environments(&self) -> impl Future<Output = Result<Vec<Environment>>> + Send;
    fn create_environment(
        &self,
        req: CreateEnvironment,
    ) -> impl Future<Output = Result<EnvironmentCreated>> + Send;
    fn get_environment(&self, name: &str) -> impl Future<Output = Result<Environment>> + Send;
    /// Stops the VM and releases its files; refuses (409) while children depend on layers
    /// only it holds, unless `force`.
    fn delete_environment(
        &self,
        name: &str,
        force: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    fn pause(&self, name: &str) -> impl Future<Output = Result<Environment>> + Send;
    fn resume(&self, name: &str) -> impl Future<Output = Result<Environment>> + Send;
    /// Snapshots a running environment, copying its memory in `mode` (`None`: live).
    fn snapshot(
        &self,
        name: &str,
        mode: Option<SnapshotMode>,
    ) -> impl Future<Output = Result<Snapshot>> + Send;
    /// Re-clones the environment from its parent's current state.
    fn sync(
        &self,
        name: &str,
        mode: Option<SnapshotMode>,
    ) -> impl Future<Output = Result<EnvironmentCreated>> + Send;
    /// Console output from byte `offset` on (at most `limit` bytes).
    fn console(
        &self,
        name: &str,
        offset: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;

    /// Types `input` on the environment's console (the guest's serial input), for debugging;
    /// callers drive a guest through its agent ([`Self::exec`] and the file operations).
    fn console_input(&self, name: &str, input: Vec<u8>) -> impl Future<Output = Result<()>> + Send {
        let _ = (name, input);
        async { Err(ApiError::not_found("console input is not supported here")) }
    }

    /// Runs a command in the environment's guest, through its agent.
    fn exec(
        &self,
        name: &str,
        req: ExecRequest,
    ) -> impl Future<Output = Result<ExecResult>> + Send {
        let _ = (name, req);
        async { Err(ApiError::not_found("exec is not supported here")) }
    }

    /// Reads the guest file `path` (absolute), through the agent.
    fn read_file(&self, name: &str, path: &str) -> impl Future<Output = Result<Vec<u8>>> + Send {
        let _ = (name, path);
        async { Err(ApiError::not_found("files are not supported here")) }
    }

    /// Writes the guest file `path` (absolute; created with `mode`, or 0644), through the agent.
    fn write_file(
        &self,
        name: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (name, path, data, mode);
        async { Err(ApiError::not_found("files are not supported here")) }
    }

    /// State changes from now on.
    fn subscribe(&self) -> broadcast::Receiver<Event>;
    /// Prometheus text exposition of the daemon's own figures (the HTTP layer adds its own).
    fn metrics(&self) -> String;
}
