//! `groved`: Grove's daemon. Keeps the state in SQLite under the data directory, supervises
//! one `grove-vmm` per environment, and serves the HTTP API on a Unix socket (mode 0600) and,
//! when asked, on TCP with a bearer token. VMMs outlive a restart of the daemon, which
//! re-attaches to them. With `--network`, every new environment gets a network namespace of
//! its own (`docs/networking.md`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use grove_api::http::{bind_unix, serve, BearerToken, Listeners};
use grove_api::jail::JailSettings;
use grove_api::network::NetworkConfig;
use grove_api::orchestrator::Orchestrator;
use grove_api::paths;
use grove_api::signing::SnapshotSigning;
use grove_api::supervisor::Supervisor;

#[derive(Parser)]
#[command(
    name = "groved",
    version,
    about = "Grove's daemon: environments per branch over an HTTP API"
)]
struct Args {
    /// State directory (database, environments, snapshots) [default: $GROVE_DATA,
    /// /var/lib/grove for root, ~/.local/share/grove otherwise].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to serve [default: $GROVE_SOCKET, /run/grove/groved.sock for root].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve on TCP at this address (every request then needs the bearer token).
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    listen: Option<String>,
    /// File holding the bearer token for TCP clients (at least 16 characters).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Network environments: each VM in a network namespace of its own, with an address
    /// from --net-pool, NAT, and published ports (needs root, iproute2 and nftables; see
    /// docs/networking.md).
    #[arg(long)]
    network: bool,
    /// Addresses for environments, one /30 each.
    #[arg(
        long,
        value_name = "CIDR",
        default_value = "10.213.0.0/16",
        requires = "network"
    )]
    net_pool: String,
    /// Names of the environments' network namespaces: PREFIX<id>.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "grove-",
        requires = "network"
    )]
    netns_prefix: String,
    /// Names of the host ends of the environments' veth pairs: PREFIX<id> (prefix at most 8
    /// bytes).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "gv",
        requires = "network"
    )]
    veth_prefix: String,
    /// Address published ports listen on.
    #[arg(
        long,
        value_name = "IP",
        default_value = "127.0.0.1",
        requires = "network"
    )]
    publish_addr: std::net::IpAddr,
    /// Take published ports from this range (default: ephemeral ports).
    #[arg(long, value_name = "LOW-HIGH", requires = "network")]
    publish_ports: Option<String>,
    /// Environment N's VMM runs jailed as uid and gid BASE+N (docs/jail.md). Jailing is
    /// the default when groved runs as root.
    #[arg(long, value_name = "BASE", default_value_t = grove_api::jail::DEFAULT_UID_BASE)]
    jail_uid_base: u32,
    /// Run VMMs unjailed, as the daemon's user (the only choice when not root).
    #[arg(long)]
    no_jail: bool,
    /// Sign every snapshot with this key (HMAC-SHA256 over a manifest of hashes; at least
    /// 32 bytes, readable by the daemon's user only). Read once at startup; it never
    /// reaches a VMM (docs/snapshot-format.md, "Authenticity").
    #[arg(long, value_name = "FILE")]
    snapshot_key: Option<PathBuf>,
    /// Verify every snapshot before a restore (branch, sync) and refuse one that is
    /// unsigned, signed with another key or changed since (500 snapshot_unverified).
    #[arg(long, requires = "snapshot_key")]
    require_signed_snapshots: bool,
}

impl Args {
    /// The networking configuration, when --network is given; sets up the host side.
    fn network(&self) -> anyhow::Result<Option<NetworkConfig>> {
        if !self.network {
            return Ok(None);
        }
        let publish_ports = match &self.publish_ports {
            None => None,
            Some(text) => {
                let range = text
                    .split_once('-')
                    .and_then(|(lo, hi)| Some((lo.parse::<u16>().ok()?, hi.parse::<u16>().ok()?)))
                    .filter(|(lo, hi)| *lo > 0 && lo <= hi)
                    .ok_or_else(|| {
                        anyhow::anyhow!("--publish-ports {text:?}: expected LOW-HIGH, 1-65535")
                    })?;
                Some(range.0..=range.1)
            }
        };
        let config = NetworkConfig {
            pool: self.net_pool.parse()?,
            netns_prefix: self.netns_prefix.clone(),
            veth_prefix: self.veth_prefix.clone(),
            publish_addr: self.publish_addr,
            publish_ports,
        };
        config.validate()?;
        grove_api::network::ensure_host(&config)
            .map_err(|e| anyhow::anyhow!("cannot prepare the host for networking: {e:#}"))?;
        Ok(Some(config))
    }
}

fn build_default_images() -> Result<(PathBuf, PathBuf), String> {
    let cache = grove_images::default_cache_dir().map_err(|e| e.to_string())?;
    let set = grove_images::build_default(&cache).map_err(|e| e.to_string())?;
    Ok((set.vmlinux, set.rootfs))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The key first: a bad key file stops the daemon before it changes anything.
    let signing = args
        .snapshot_key
        .as_deref()
        .map(|path| SnapshotSigning::from_key_file(path, args.require_signed_snapshots))
        .transpose()?;
    let network = args.network()?;
    let data = args.data_dir.unwrap_or_else(paths::default_data_dir);
    // Absolute and free of links: jailed VMMs see their files under these very names.
    let data = std::fs::create_dir_all(&data)
        .and_then(|()| data.canonicalize())
        .map_err(|e| anyhow::anyhow!("cannot use data directory {}: {e}", data.display()))?;
    let socket = args.socket.unwrap_or_else(paths::default_socket);
    let mut supervisor = Supervisor::new(Supervisor::find_vmm_bin());
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if root && !args.no_jail {
        supervisor = supervisor.with_jail(JailSettings {
            uid_base: args.jail_uid_base,
            jails_dir: data.join("jails"),
        });
    } else if !args.no_jail {
        log::warn!("not root: VMMs run unjailed (see docs/jail.md)");
    }
    let orchestrator = Orchestrator::open_with_network(
        &data,
        supervisor,
        Arc::new(build_default_images),
        network,
    )?;
    if let Some(signing) = signing {
        log::info!(
            "groved: signing snapshots with key {}{}",
            signing.key_id(),
            if signing.required() {
                "; restores require a valid signature"
            } else {
                ""
            }
        );
        orchestrator.set_snapshot_signing(signing)?;
    }
    orchestrator.recover()?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut listeners = Listeners::unix(
        bind_unix(&socket)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?,
    );
    if let Some(addr) = &args.listen {
        let token_file = args.token_file.clone().unwrap_or_default();
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", token_file.display()))?;
        let token = BearerToken::new(token.trim())
            .map_err(|e| anyhow::anyhow!("{}: {e}", token_file.display()))?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        listeners = listeners.with_tcp(tcp, token);
    }
    log::info!(
        "groved: data in {}, listening on {}",
        data.display(),
        socket.display()
    );
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        log::info!("groved: shutting down (VMMs keep running)");
    };
    serve(orchestrator, listeners, shutdown).await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env(env_logger::Env::new().filter("GROVE_LOG"))
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("groved: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("groved: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
