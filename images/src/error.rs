//! The crate's single error type.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::kconfig::ConfigMismatch;

/// The command that builds the default image set, quoted in error messages.
pub const BUILD_COMMAND: &str = "cargo run --release -p grove-images -- build";

/// Everything that can go wrong while locating or building the image set.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// No cache directory could be derived from the environment.
    #[error(
        "cannot choose a cache directory: none of GROVE_CACHE_DIR, XDG_CACHE_HOME and HOME is set; \
         set GROVE_CACHE_DIR or pass --cache-dir"
    )]
    NoCacheDir,

    /// The default image set for the current inputs is not in the cache.
    #[error("the default guest image set is not built in {}: run `{BUILD_COMMAND}`", cache_dir.display())]
    NotBuilt {
        /// The cache directory that was searched.
        cache_dir: PathBuf,
    },

    /// The image set directory exists but does not match its manifest.
    #[error(
        "the image set in {} is damaged ({detail}): delete that directory and run `{BUILD_COMMAND}`",
        dir.display()
    )]
    Damaged {
        /// The image set directory.
        dir: PathBuf,
        /// What does not match.
        detail: String,
    },

    /// A program needed by the build is not installed.
    #[error(
        "`{tool}` not found in PATH, /usr/sbin or /sbin: install the Debian package `{package}` \
         (the project's .ci/run installs all image build dependencies)"
    )]
    MissingTool {
        /// The program name.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// A header or library needed by the kernel build is not installed.
    #[error(
        "{} not found: install the Debian package `{package}` \
         (the project's .ci/run installs all image build dependencies)",
        path.display()
    )]
    MissingFile {
        /// The file that should exist.
        path: PathBuf,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// apt knows no installable version of a package.
    #[error(
        "apt has no installation candidate for `{package}`: run `apt-get update` (as root) \
         so that the Debian package lists are present, then build again"
    )]
    NoCandidate {
        /// The package name.
        package: String,
    },

    /// A program could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },

    /// A program ran and failed.
    #[error(
        "{what} failed: `{command}` exited with {status}{}",
        format_details(log, output)
    )]
    CommandFailed {
        /// What the command was doing, for the reader.
        what: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Where its complete output was written, if to a file.
        log: Option<PathBuf>,
        /// The last lines of its output.
        output: String,
    },

    /// A kernel patch does not apply to the Debian kernel source.
    #[error(
        "kernel patch {patch} does not apply to linux-source-6.1 {version}; update the patch under \
         images/kernel/patches/ for this source version{}",
        format_details(&None, output)
    )]
    PatchFailed {
        /// The patch file name.
        patch: String,
        /// The Debian package version of the source.
        version: String,
        /// The output of patch(1).
        output: String,
    },

    /// Some fragment lines did not survive `make allnoconfig`.
    #[error(
        "kernel config: these lines of images/kernel/microvm.fragment did not hold in the resolved \
         .config (missing dependency, or a symbol that does not exist in this kernel; see {}): {}",
        config.display(),
        mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    ConfigMismatch {
        /// The resolved .config.
        config: PathBuf,
        /// Every line that did not hold.
        mismatches: Vec<ConfigMismatch>,
    },

    /// No cargo to build the guest agent with.
    #[error(
        "cargo not found (neither $CARGO nor `cargo` in PATH): the root filesystem's grove-agent \
         is built with the workspace's Rust toolchain (rustup, rust-toolchain.toml)"
    )]
    NoCargo,

    /// The agent's sources are not where this grove-images was compiled.
    #[error(
        "the grove-agent sources are not in {}: the root filesystem is built from the source \
         tree grove-images was compiled in; run `{BUILD_COMMAND}` there",
        workspace.display()
    )]
    AgentSourcesMissing {
        /// The workspace grove-images was compiled in.
        workspace: PathBuf,
    },

    /// The agent's sources on disk differ from those embedded in (and keyed by) grove-images.
    #[error(
        "{} changed since grove-images was compiled, so the image key would not match the \
         agent built from it: run `{BUILD_COMMAND}` (cargo rebuilds grove-images first)",
        path.display()
    )]
    AgentSourcesChanged {
        /// The first file found to differ (or to be new).
        path: PathBuf,
    },

    /// The Rust compiler the agent would be built with is not the one the key names.
    #[error(
        "grove-images was compiled with `{compiled_with}`, but the agent would be built with \
         `{found}`: run `{BUILD_COMMAND}` with the workspace's toolchain (rust-toolchain.toml)"
    )]
    RustcChanged {
        /// `rustc -V` embedded at compile time.
        compiled_with: String,
        /// `rustc -V` now.
        found: String,
    },

    /// A build step produced something unexpected.
    #[error("{0}")]
    Unexpected(String),

    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A manifest could not be read or written as JSON.
    #[error(
        "{} is not a valid image set manifest: delete its directory and run `{BUILD_COMMAND}`",
        path.display()
    )]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl ImagesError {
    /// Shorthand for [`ImagesError::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Formats the optional log location and output tail of a failed command.
fn format_details(log: &Option<PathBuf>, output: &str) -> String {
    let mut text = String::new();
    if let Some(log) = log {
        text.push_str(&format!("; full log: {}", log.display()));
    }
    let output = output.trim_end();
    if !output.is_empty() {
        text.push_str(":\n");
        text.push_str(output);
    }
    text
}
