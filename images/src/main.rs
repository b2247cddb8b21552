//! `grove-images`: builds or locates Grove's default guest image set.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Builds and locates Grove's default guest image set (kernel + root
/// filesystem), cached outside the repository under a key of all inputs.
#[derive(Parser)]
#[command(name = "grove-images", version)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Build whatever is missing (a quick no-op when cached); prints the image
    /// set directory as the last line on stdout, progress on stderr.
    Build {
        /// Cache directory [default: $GROVE_CACHE_DIR, else
        /// $XDG_CACHE_HOME/grove, else $HOME/.cache/grove].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Print the image set directory if it is built; exit 1 otherwise.
    Path {
        /// Cache directory [default: as for `build`].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

fn cache_dir(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(dir) => Ok(dir),
        None => Ok(grove_images::default_cache_dir()?),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Action::Build { cache_dir: dir } => {
            let dir = cache_dir(dir)?;
            let set = grove_images::build_default(&dir)
                .with_context(|| format!("building the default image set in {}", dir.display()))?;
            println!("{}", set.dir.display());
        }
        Action::Path { cache_dir: dir } => {
            // The error of `locate_default` is one line that says what to run.
            let set = grove_images::locate_default(&cache_dir(dir)?)?;
            println!("{}", set.dir.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grove-images: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
