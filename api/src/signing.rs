//! The daemon's snapshot signatures (`groved --snapshot-key`, `--require-signed-snapshots`;
//! docs/control-plane.md). The key stays in the daemon: it signs each snapshot once the
//! snapshot is in the daemon's snapshot directory (out of the VMM's jail) and verifies it
//! before a restore, both on tokio's blocking threads because they hash files. One
//! [`HashCache`] for the daemon's life saves hashing the same frozen layers again at every
//! branch (see `vmm::snapshot::auth`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm::snapshot::auth::{self, AuthError, HashCache, SnapshotKey};

use crate::error::ApiError;

/// The error code of a restore refused because its snapshot does not verify.
pub const SNAPSHOT_UNVERIFIED: &str = "snapshot_unverified";

/// The daemon's key, and whether restores require a signature.
pub struct SnapshotSigning {
    key: Arc<SnapshotKey>,
    require: bool,
    cache: Arc<HashCache>,
    /// Tests: runs on each snapshot right after it is signed (to change it behind the
    /// daemon's back, as a compromised snapshot store would).
    #[cfg(test)]
    pub(crate) after_sign: std::sync::Mutex<Option<AfterSign>>,
}

/// Tests: what [`SnapshotSigning::sign`] runs on a snapshot once it is signed.
#[cfg(test)]
pub(crate) type AfterSign = Box<dyn Fn(&Path) + Send>;

impl std::fmt::Debug for SnapshotSigning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSigning")
            .field("key", &self.key)
            .field("require", &self.require)
            .finish_non_exhaustive()
    }
}

impl SnapshotSigning {
    /// Signs every snapshot with `key`; with `require`, restores verify first.
    pub fn new(key: SnapshotKey, require: bool) -> Self {
        Self {
            key: Arc::new(key),
            require,
            cache: Arc::default(),
            #[cfg(test)]
            after_sign: std::sync::Mutex::default(),
        }
    }

    /// Reads the key file (groved's `--snapshot-key`); a bad key file is a one-line error.
    pub fn from_key_file(path: &Path, require: bool) -> Result<Self, AuthError> {
        Ok(Self::new(SnapshotKey::from_file(path)?, require))
    }

    pub fn key_id(&self) -> &str {
        self.key.key_id()
    }

    pub fn required(&self) -> bool {
        self.require
    }

    /// Signs the snapshot `dir` (a 500 `internal` error if it cannot be). Its state was
    /// written by a VMM: it may name only disk layers among `layers` (the daemon's records
    /// of the snapshot's frozen layer and those below it), compared after resolving links.
    pub async fn sign(&self, id: &str, dir: &Path, layers: Vec<PathBuf>) -> Result<(), ApiError> {
        let (key, cache, path) = (self.key.clone(), self.cache.clone(), dir.to_path_buf());
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        run_blocking(move || {
            let allowed: Vec<PathBuf> = layers.iter().map(|p| canonical(p)).collect();
            auth::sign_allowed(&path, &key, &cache, &|p| allowed.contains(&canonical(p)))
                .map(|_| ())
        })
        .await
        .map_err(|e| ApiError::internal(format!("cannot sign snapshot {id}: {e}")))?;
        #[cfg(test)]
        if let Some(hook) = self
            .after_sign
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            hook(dir);
        }
        Ok(())
    }

    /// When signatures are required, checks that the snapshot `dir` is signed with the
    /// daemon's key and unchanged; a refusal is 500 `snapshot_unverified` (the snapshot
    /// store is not the caller's doing). Without the requirement, does nothing.
    pub async fn verify_before_restore(&self, id: &str, dir: &Path) -> Result<(), ApiError> {
        if !self.require {
            return Ok(());
        }
        let (key, cache, path) = (self.key.clone(), self.cache.clone(), dir.to_path_buf());
        run_blocking(move || auth::verify_cached(&path, &key, &cache).map(|_| ()))
            .await
            .map_err(|e| {
                ApiError::new(
                    500,
                    SNAPSHOT_UNVERIFIED,
                    format!("snapshot {id} cannot be restored: {e}"),
                )
            })
    }
}

/// Runs `work` on a blocking thread; a panic there becomes an error message.
async fn run_blocking(
    work: impl FnOnce() -> Result<(), AuthError> + Send + 'static,
) -> Result<(), String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| one_line(&e)),
        Err(e) => Err(format!("the hashing task failed: {e}")),
    }
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
#[path = "signing_tests.rs"]
pub(crate) mod tests;
