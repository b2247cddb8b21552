//! Networking of environments (`docs/networking.md`): one network namespace per environment
//! with a TAP for its VM, a veth pair to the host with an address of its own, NAT between
//! the two, and TCP ports published on the host.
//!
//! ```text
//! host netns                         | netns grove-<id>                 | guest
//! gv<id> 10.213.x.1/30 ── veth ──────┤ veth0 10.213.x.2/30              |
//!   masquerade of the pool outwards  |   DNAT 10.213.x.2 → 172.16.0.2   |
//!   (table ip grove_<veth prefix>)   |   SNAT 172.16.0.2 → 10.213.x.2   |
//!                                    |     (only if outbound allowed)   |
//! daemon: host port ──proxy──► 10.213.x.2:port                         |
//!                                    | tap0 172.16.0.1/30 ── virtio-net ─ eth0 172.16.0.2/30
//! ```
//!
//! Every environment's guest has the same address and MAC ([`GUEST_ADDR`], [`GUEST_MAC`]),
//! so a clone restored from a snapshot keeps working without re-addressing: its VMM runs in a
//! namespace of its own, where `tap0` is its own TAP. What tells environments apart is the
//! namespace's veth address, one /30 of a pool per environment.
//!
//! Namespaces, links and addresses are made with `ip` (iproute2), the firewall with
//! `nft -f -` (nftables), both run as child processes. Everything here is synchronous: the
//! daemon calls it on blocking threads. [`PortProxy`] is the exception: a tokio task.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The guest's address inside every environment (the default image's init sets it).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The TAP's address in every namespace: the guest's default gateway.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The guest's MAC address in every environment.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The TAP in every namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace's end of the veth pair.
pub const NS_VETH: &str = "veth0";
/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Most TCP connections one published port carries at once.
pub const MAX_PROXY_CONNECTIONS: usize = 256;
/// How long a proxied connection may take to reach the guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up or tearing down networks.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network pool {0:?}: expected an IPv4 prefix like 10.213.0.0/16, at most /30")]
    Pool(String),
    #[error("the network pool {pool} is full ({slots} environments)")]
    PoolFull { pool: Ipv4Net, slots: u32 },
    #[error("interface name {0:?} is longer than 15 bytes; use a shorter --veth-prefix")]
    IfName(String),
    #[error("invalid {what} {value:?}: {reason}")]
    Prefix {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "cannot run {program} (is it installed? groved's networking needs iproute2 and nftables)"
    )]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Command { what: String, stderr: String },
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// An IPv4 prefix, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    /// How many /30 subnets (one per environment) the prefix holds.
    pub fn slots(&self) -> u32 {
        1u32 << (30 - u32::from(self.len))
    }

    /// The first address of the `slot`-th /30.
    fn subnet(&self, slot: u32) -> Option<Ipv4Addr> {
        if slot >= self.slots() {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.addr) + slot * 4))
    }
}

impl FromStr for Ipv4Net {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::Pool(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > 30 {
            return Err(bad());
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if u32::from(addr) & !mask != 0 {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// How the daemon networks its environments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// One /30 per environment is taken from here.
    pub pool: Ipv4Net,
    /// Namespaces are named `<prefix><environment id>`.
    pub netns_prefix: String,
    /// Host ends of the veth pairs are named `<prefix><environment id>`.
    pub veth_prefix: String,
    /// Published ports listen on this address.
    pub publish_addr: IpAddr,
    /// Published ports are taken from this range; ephemeral ports when absent.
    pub publish_ports: Option<RangeInclusive<u16>>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            pool: Ipv4Net {
                addr: Ipv4Addr::new(10, 213, 0, 0),
                len: 16,
            },
            netns_prefix: "grove-".into(),
            veth_prefix: "gv".into(),
            publish_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            publish_ports: None,
        }
    }
}

/// Longest veth prefix: leaves room for 7-digit environment ids in a 15-byte name.
pub const MAX_VETH_PREFIX: usize = 8;

impl NetworkConfig {
    /// Checks the names it will give: both prefixes non-empty, of letters, digits, `-` and
    /// `_`, the veth prefix at most [`MAX_VETH_PREFIX`] bytes.
    pub fn validate(&self) -> Result<(), NetworkError> {
        for (what, value, max) in [
            ("namespace prefix", &self.netns_prefix, 64),
            ("veth prefix", &self.veth_prefix, MAX_VETH_PREFIX),
        ] {
            let bad = |reason| NetworkError::Prefix {
                what,
                value: value.clone(),
                reason,
            };
            if value.is_empty() || value.len() > max {
                return Err(bad(if value.is_empty() {
                    "it is empty"
                } else {
                    "it is too long"
                }));
            }
            if !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad("use letters, digits, '-' and '_'"));
            }
        }
        Ok(())
    }

    /// The network of environment `env_id` in its `slot` of the pool.
    pub fn env_network(
        &self,
        env_id: i64,
        slot: u32,
        allow_outbound: bool,
    ) -> Result<EnvNetwork, NetworkError> {
        let base = self.pool.subnet(slot).ok_or(NetworkError::PoolFull {
            pool: self.pool,
            slots: self.pool.slots(),
        })?;
        let veth = format!("{}{env_id}", self.veth_prefix);
        if veth.len() > 15 {
            return Err(NetworkError::IfName(veth));
        }
        let base = u32::from(base);
        Ok(EnvNetwork {
            netns: self.netns_name(env_id),
            veth,
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
            allow_outbound,
        })
    }

    pub fn netns_name(&self, env_id: i64) -> String {
        format!("{}{env_id}", self.netns_prefix)
    }

    /// The environment id of a namespace this configuration names.
    pub fn env_id_of(&self, netns: &str) -> Option<i64> {
        netns.strip_prefix(&self.netns_prefix)?.parse().ok()
    }

    /// The host's nft table: one per veth prefix, so daemons that network with different
    /// prefixes do not rewrite each other's rules.
    pub fn host_table(&self) -> String {
        let clean: String = self
            .veth_prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("grove_{clean}")
    }
}

/// The lowest slot of `0..slots` not in `used`.
pub fn first_free_slot(used: &[u32], slots: u32) -> Option<u32> {
    let mut used = used.to_vec();
    used.sort_unstable();
    used.dedup();
    let mut next = 0;
    for u in used {
        if u > next {
            break;
        }
        if u == next {
            next += 1;
        }
    }
    (next < slots).then_some(next)
}

/// One environment's network: its namespace, its veth pair and their addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvNetwork {
    pub netns: String,
    /// The host end of the veth pair (the namespace's end is [`NS_VETH`]).
    pub veth: String,
    /// The host end's address.
    pub host_addr: Ipv4Addr,
    /// The namespace end's address: the environment's address on the host, DNATed to the
    /// guest.
    pub ns_addr: Ipv4Addr,
    /// Whether the guest may open connections out of its namespace.
    pub allow_outbound: bool,
}

impl EnvNetwork {
    /// The nftables ruleset of the namespace: inbound connections to the namespace's address
    /// go to the guest; the guest's own connections leave (translated to the namespace's
    /// address) only when outbound is allowed, and never with another source address.
    /// Replacing the table is one transaction, so applying it twice is harmless.
    pub fn ruleset(&self) -> String {
        let (ns, guest) = (self.ns_addr, GUEST_ADDR);
        let (snat, deny) = if self.allow_outbound {
            (
                format!("oifname \"{NS_VETH}\" ip saddr {guest} snat to {ns}"),
                String::new(),
            )
        } else {
            (
                String::new(),
                format!("iifname \"{TAP_NAME}\" drop comment \"outbound denied\""),
            )
        };
        format!(
            "table ip grove\n\
             delete table ip grove\n\
             table ip grove {{\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"{NS_VETH}\" ip daddr {ns} dnat to {guest}\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\t{snat}\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{TAP_NAME}\" ip saddr != {guest} drop\n\
             \t\tct state established,related accept\n\
             \t\t{deny}\n\
             \t}}\n\
             }}\n"
        )
    }
}

/// Runs `program` with `args`, feeding it `stdin`; fails with its stderr.
fn run(program: &'static str, args: &[&str], stdin: &str, what: &str) -> Result<(), NetworkError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn { program, source })?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(io_err(format!("write to {program}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("wait for {program}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetworkError::Command {
        what: what.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; "),
    })
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    std::fs::write(path, value).map_err(io_err(format!("write {path}")))
}

/// The path of the named namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Opens the named namespace, for `setns(2)`.
pub fn open_netns(name: &str) -> Result<File, NetworkError> {
    File::open(netns_path(name)).map_err(io_err(format!("open network namespace {name}")))
}

/// Runs `f` on a new thread that has joined the named namespace; processes it starts are in
/// that namespace too. The thread ends with `f`, so no other code ever runs in it.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, NetworkError> + Send + 'static,
) -> Result<T, NetworkError> {
    let ns = open_netns(name)?;
    let name = name.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns takes a descriptor and a flag; it moves only this thread, which
        // exists for `f` alone.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io_err(format!("enter network namespace {name}"))(
                io::Error::last_os_error(),
            ));
        }
        drop(ns);
        f()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetworkError::Io {
            what: "run in a network namespace".into(),
            source: io::Error::other("the thread panicked"),
        })
    })
}

/// Makes the host forward and masquerade for the pool: `ip_forward`, and the table
/// [`NetworkConfig::host_table`], atomically replaced by its current rules (so it is created
/// idempotently; nothing removes it). Environments do not reach each other through the host.
pub fn ensure_host(config: &NetworkConfig) -> Result<(), NetworkError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    let table = config.host_table();
    let veths = format!("{}*", config.veth_prefix);
    let ruleset = format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {pool} oifname != \"{veths}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{veths}\" oifname \"{veths}\" drop comment \"environments are isolated\"\n\
         \t}}\n\
         }}\n",
        pool = config.pool
    );
    run("nft", &["-f", "-"], &ruleset, "nft (host table)")
}

/// Whether the named namespace exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Creates the environment's namespace, its veth pair, its persistent `tap0` and its
/// firewall. A namespace of the same name left over from before is removed first.
pub fn setup(net: &EnvNetwork) -> Result<(), NetworkError> {
    teardown(net)?;
    let host = format!(
        "netns add {ns}\n\
         link add name {veth} type veth peer name {NS_VETH} netns {ns}\n\
         addr add {host}/30 dev {veth}\n\
         link set dev {veth} up\n",
        ns = net.netns,
        veth = net.veth,
        host = net.host_addr,
    );
    run("ip", &["-batch", "-"], &host, "ip (host side)")?;
    let inside = format!(
        "link set dev lo up\n\
         addr add {ns}/30 dev {NS_VETH}\n\
         link set dev {NS_VETH} up\n\
         tuntap add dev {TAP_NAME} mode tap vnet_hdr\n\
         addr add {GATEWAY_ADDR}/30 dev {TAP_NAME}\n\
         link set dev {TAP_NAME} up\n\
         route add default via {host}\n",
        ns = net.ns_addr,
        host = net.host_addr,
    );
    let ruleset = net.ruleset();
    let result = in_netns(&net.netns, move || {
        run("ip", &["-batch", "-"], &inside, "ip (namespace side)")?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        run("nft", &["-f", "-"], &ruleset, "nft (namespace)")
    });
    if result.is_err() {
        let _ = teardown(net);
    }
    result
}

/// Removes the environment's namespace (its TAP and the veth pair go with it) and the host
/// end of the veth if it survived. Nothing to remove is success.
pub fn teardown(net: &EnvNetwork) -> Result<(), NetworkError> {
    if netns_exists(&net.netns) {
        run(
            "ip",
            &["netns", "delete", &net.netns],
            "",
            "ip netns delete",
        )?;
    }
    // The kernel dismantles a namespace's devices asynchronously; the veth pair goes with
    // them once the namespace's last user (a VMM still exiting) is gone.
    for _ in 0..100 {
        if !interface_exists(&net.veth) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let deleted = run(
        "ip",
        &["link", "delete", "dev", &net.veth],
        "",
        "ip link delete",
    );
    match deleted {
        Err(_) if !interface_exists(&net.veth) => Ok(()),
        other => other,
    }
}

/// Whether this thread's network namespace has an interface `name` (asked of the kernel,
/// not of `/sys`, which shows the namespace it was mounted in).
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated name and touches nothing else.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The named namespaces whose names start with `prefix`.
pub fn namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A TCP port of the host forwarded to a port of an environment: every connection accepted
/// on `host_addr` is copied both ways to `target`. Dropping it closes the listener and every
/// connection it carries.
#[derive(Debug)]
pub struct PortProxy {
    host_addr: SocketAddr,
    /// The accept loop; it owns the connections' tasks, so aborting it ends them too.
    serve: tokio::task::JoinHandle<()>,
}

impl PortProxy {
    /// Listens on `bind`: the given port, or (port 0) the first free port of `range`, or an
    /// ephemeral one. Must be called within a tokio runtime.
    pub fn start(
        bind: SocketAddr,
        range: Option<&RangeInclusive<u16>>,
        target: SocketAddr,
    ) -> io::Result<Self> {
        let listener = Self::bind(bind, range)?;
        let host_addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let serve = tokio::spawn(serve(listener, target));
        Ok(Self { host_addr, serve })
    }

    fn bind(
        bind: SocketAddr,
        range: Option<&RangeInclusive<u16>>,
    ) -> io::Result<std::net::TcpListener> {
        let listen = |addr| {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, io::Error>(l)
        };
        match range {
            Some(range) if bind.port() == 0 => {
                for port in range.clone() {
                    if let Ok(l) = listen(SocketAddr::new(bind.ip(), port)) {
                        return Ok(l);
                    }
                }
                Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "every port of {}-{} on {} is taken",
                        range.start(),
                        range.end(),
                        bind.ip()
                    ),
                ))
            }
            _ => listen(bind),
        }
    }

    /// Where the port listens.
    pub fn host_addr(&self) -> SocketAddr {
        self.host_addr
    }
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

async fn serve(listener: TcpListener, target: SocketAddr) {
    let limit = Arc::new(Semaphore::new(MAX_PROXY_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections while waiting.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let mut inbound = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("published port {target}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(async move {
            let _permit = permit;
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
            let mut outbound = match connect {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    log::debug!("published port: cannot reach {target}: {e}");
                    return;
                }
                Err(_) => {
                    log::debug!("published port: {target} did not answer");
                    return;
                }
            };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// The published ports of every environment, by environment id.
#[derive(Default)]
pub struct Proxies(Mutex<HashMap<i64, Vec<(u16, PortProxy)>>>);

impl Proxies {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Vec<(u16, PortProxy)>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `proxy` as environment `env_id`'s port `guest_port`.
    pub fn insert(&self, env_id: i64, guest_port: u16, proxy: PortProxy) {
        self.map()
            .entry(env_id)
            .or_default()
            .push((guest_port, proxy));
    }

    /// Closes every published port of the environment.
    pub fn remove(&self, env_id: i64) {
        self.map().remove(&env_id);
    }

    /// Whether the environment's `guest_port` is published by this daemon.
    pub fn contains(&self, env_id: i64, guest_port: u16) -> bool {
        self.map()
            .get(&env_id)
            .is_some_and(|v| v.iter().any(|(p, _)| *p == guest_port))
    }
}

#[cfg(test)]
#[path = "network_tests.rs"]
mod tests;
