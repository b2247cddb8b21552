//! `grove-vmm snapshot-sign` and `snapshot-verify`, and the key of `restore --verify-key`
//! (docs/snapshot-format.md, "Authenticity").

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use vmm::snapshot::auth::{self, SnapshotKey};

#[derive(Args)]
pub struct AuthArgs {
    /// Snapshot directory.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Key file: at least 32 bytes (its raw bytes are the key), readable by its owner only.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
}

/// The error and its causes on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("grove-vmm: error: {}", one_line(e));
    ExitCode::from(2)
}

/// Reads the key of `restore --verify-key`; a bad key file is exit code 2.
pub fn read_key(path: Option<&Path>) -> Result<Option<SnapshotKey>, ExitCode> {
    path.map(SnapshotKey::from_file)
        .transpose()
        .map_err(|e| fail(&e))
}

/// `snapshot-sign`: writes DIR/manifest.json and DIR/manifest.hmac.
pub fn sign(args: AuthArgs) -> ExitCode {
    let result = SnapshotKey::from_file(&args.key_file)
        .and_then(|key| auth::sign(&args.snapshot, &key).map(|m| (key, m)));
    match result {
        Ok((key, manifest)) => {
            log::info!(
                "signed {} with key {} ({} disk layers)",
                args.snapshot.display(),
                key.key_id(),
                manifest.layers.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `snapshot-verify`: exit 0 when the snapshot (and its parents) verify, else 2.
pub fn verify(args: AuthArgs) -> ExitCode {
    let result = SnapshotKey::from_file(&args.key_file)
        .and_then(|key| auth::verify(&args.snapshot, &key).map(|_| key));
    match result {
        Ok(key) => {
            log::info!(
                "{} is signed with key {} and unchanged",
                args.snapshot.display(),
                key.key_id()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}
