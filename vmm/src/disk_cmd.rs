//! `grove-vmm disk ...`: disk images and their chains of layers.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vmm::disk::{self, DiskFormat, LayerRecord, OpenOptions};

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create an empty qcow2 image, optionally on a backing layer (O(1) in its size).
    Create(CreateArgs),
    /// Check an image and its chain (metadata, formats, depth) and print the chain.
    Info(InfoArgs),
    /// Merge into a frozen layer the layers below it that nothing else uses.
    Compact(CompactArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The new image; must not exist.
    output: PathBuf,
    /// Backing layer of the new image.
    #[arg(long, value_name = "PATH")]
    backing: Option<PathBuf>,
    /// Format of the backing layer (never guessed).
    #[arg(long, value_name = "raw|qcow2", requires = "backing")]
    backing_format: Option<DiskFormat>,
    /// Virtual size in bytes (a multiple of 512); defaults to the backing layer's.
    #[arg(long, value_name = "BYTES")]
    size: Option<u64>,
}

#[derive(Args)]
pub struct InfoArgs {
    /// The image.
    path: PathBuf,
    /// Its format.
    #[arg(long, value_name = "raw|qcow2")]
    format: DiskFormat,
    /// Follow the backing files the image names.
    #[arg(long)]
    allow_backing: bool,
    /// Most layers the chain may have.
    #[arg(long, value_name = "N", default_value_t = disk::DEFAULT_MAX_CHAIN_DEPTH)]
    max_chain_depth: usize,
}

#[derive(Args)]
pub struct CompactArgs {
    /// A frozen qcow2 layer (not an image a VM writes).
    top: PathBuf,
    /// Another directory whose images and snapshots may use layers of this chain
    /// (repeatable; the layer's own directory is always scanned).
    #[arg(long, value_name = "DIR")]
    refs: Vec<PathBuf>,
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    eprintln!("grove-vmm: error: {message}");
    ExitCode::from(2)
}

fn print_chain(chain: &[LayerRecord]) {
    for (i, layer) in chain.iter().enumerate() {
        println!("{i}: {} {}", layer.format, layer.path.display());
    }
}

pub fn run(cmd: DiskCommand) -> ExitCode {
    match cmd {
        DiskCommand::Create(args) => {
            let backing = match (&args.backing, args.backing_format) {
                (Some(path), Some(format)) => Some(LayerRecord {
                    path: path.clone(),
                    format,
                }),
                (Some(_), None) => {
                    eprintln!(
                        "grove-vmm: error: --backing needs --backing-format raw|qcow2 \
                         (formats are never guessed)"
                    );
                    return ExitCode::from(2);
                }
                (None, _) => None,
            };
            let size = match (args.size, &backing) {
                (Some(size), _) => size,
                (None, Some(b)) => match disk::chain::virtual_size(&b.path, b.format) {
                    Ok(size) => size,
                    Err(e) => return fail(&e),
                },
                (None, None) => {
                    eprintln!("grove-vmm: error: --size is required without --backing");
                    return ExitCode::from(2);
                }
            };
            match disk::create_overlay(&args.output, backing.as_ref(), size) {
                Ok(layer) => {
                    println!("{}", layer.path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        DiskCommand::Info(args) => {
            let mut opts = OpenOptions::new(&args.path, args.format, true);
            opts.allow_backing = args.allow_backing;
            opts.max_depth = args.max_chain_depth;
            match disk::walk_chain(&opts) {
                Ok(chain) => {
                    print_chain(&chain);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        DiskCommand::Compact(args) => match disk::compact::compact(&args.top, &args.refs) {
            Ok(report) => {
                for layer in &report.merged {
                    println!("merged {}", layer.display());
                }
                println!(
                    "{}: depth {} -> {}, {} bytes copied",
                    report.top.display(),
                    report.depth_before,
                    report.depth_after,
                    report.bytes_copied
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}
