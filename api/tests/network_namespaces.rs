//! Environments' networks for real, without VMs: `grove_api::network` sets up two
//! environments' namespaces, and a stand-in guest answers at 172.16.0.2 behind each one's
//! `tap0`, so the DNAT, SNAT, drop and isolation rules carry real connections.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for network namespaces), iproute2 and
//! nftables, and fails, saying so, without them. The "host" is a network namespace of the
//! test's own: nothing on the machine's own network (routes, ip_forward, nftables) changes.
//! The stand-in guest is a namespace of its own behind a veth pair that replaces the TAP
//! under the same name (`tap0`), with the guest's address and default route: every rule
//! that names `tap0` or 172.16.0.2 applies to it as to a VM.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use grove_api::network::{
    self, ensure_host, in_netns, netns_exists, setup, teardown, EnvNetwork, NetworkConfig,
    NetworkError, PortProxy, GUEST_ADDR,
};

/// An address outside every environment's namespace: on the test host's loopback.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const GUEST_PORT: u16 = 7000;

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root (network namespaces, veth pairs, nftables)"
    );
    for tool in ["ip", "nft"] {
        let found = Command::new(tool).arg("-V").output().is_ok();
        assert!(
            found,
            "this test needs `{tool}` (packages iproute2 and nftables)"
        );
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the named namespaces of this test however it ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in network::namespaces(&self.0) {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

/// The stand-in guest's namespace for environment `net`.
fn guest_ns(net: &EnvNetwork) -> String {
    format!("{}-guest", net.netns)
}

/// Replaces `tap0` in the environment's namespace by a veth of the same name and address
/// whose other end is the guest: 172.16.0.2/30, default route via 172.16.0.1.
fn stand_in_guest(net: &EnvNetwork) {
    let (ns, guest) = (net.netns.as_str(), guest_ns(net));
    ip(&["netns", "add", &guest]);
    ip(&["-n", ns, "link", "delete", "tap0"]);
    ip(&[
        "-n", ns, "link", "add", "name", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
        &guest,
    ]);
    ip(&["-n", ns, "addr", "add", "172.16.0.1/30", "dev", "tap0"]);
    ip(&["-n", ns, "link", "set", "dev", "tap0", "up"]);
    ip(&["-n", &guest, "link", "set", "dev", "lo", "up"]);
    ip(&["-n", &guest, "addr", "add", "172.16.0.2/30", "dev", "eth0"]);
    ip(&["-n", &guest, "link", "set", "dev", "eth0", "up"]);
    ip(&["-n", &guest, "route", "add", "default", "via", "172.16.0.1"]);
}

/// A TCP server that greets every connection with `banner` and closes it.
fn serve_banner(listener: TcpListener, banner: &'static str) {
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(banner.as_bytes());
        }
    });
}

/// Listens on the guest's address inside the guest's namespace.
fn guest_server(net: &EnvNetwork, banner: &'static str) {
    let listener = in_netns(&guest_ns(net), || {
        TcpListener::bind((GUEST_ADDR, GUEST_PORT)).map_err(|source| NetworkError::Io {
            what: "listen in the guest".into(),
            source,
        })
    })
    .expect("a server in the guest's namespace");
    serve_banner(listener, banner);
}

/// What a connection to `addr` reads before it closes, or why it failed.
fn banner_at(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// Sends one UDP datagram from inside the guest's namespace: traffic that needs no answer,
/// so only the namespace's own rules can stop it.
fn datagram_from_guest(net: &EnvNetwork, to: SocketAddr, payload: &'static [u8]) {
    in_netns(&guest_ns(net), move || {
        let io = |source| NetworkError::Io {
            what: "send from the guest".into(),
            source,
        };
        let sock = UdpSocket::bind((GUEST_ADDR, 0)).map_err(io)?;
        sock.send_to(payload, to).map_err(io)?;
        Ok(())
    })
    .expect("send a datagram from the guest");
}

/// The datagrams that arrive at `sock` within half a second.
fn received(sock: &UdpSocket) -> Vec<Vec<u8>> {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

/// Connects from inside the guest's namespace, as the guest would.
fn from_guest(net: &EnvNetwork, addr: SocketAddr) -> Result<String, String> {
    in_netns(&guest_ns(net), move || Ok(banner_at(addr))).expect("enter the guest's namespace")
}

#[test]
fn published_ports_reach_each_guest_and_outbound_follows_the_choice() {
    require_root_and_tools();
    let prefix = format!("grovetest{}-", std::process::id());
    let _cleanup = Cleanup(prefix.clone());
    // The test's "host": a network namespace for this thread alone.
    std::thread::spawn(move || {
        // SAFETY: unshare moves only this thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        run(&prefix);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn run(prefix: &str) {
    ip(&["link", "set", "dev", "lo", "up"]);
    ip(&["addr", "add", &format!("{OUTSIDE}/32"), "dev", "lo"]);
    let outside = TcpListener::bind((OUTSIDE, 0)).unwrap();
    let outside_addr = outside.local_addr().unwrap();
    serve_banner(outside, "outside");
    let outside_udp = UdpSocket::bind((OUTSIDE, 0)).unwrap();
    let outside_udp_addr = outside_udp.local_addr().unwrap();

    let config = NetworkConfig {
        netns_prefix: prefix.to_string(),
        veth_prefix: "gvt".into(),
        ..NetworkConfig::default()
    };
    ensure_host(&config).expect("host rules");
    let a = config.env_network(1, 0, true).unwrap();
    let b = config.env_network(2, 1, false).unwrap();
    setup(&a).expect("set up environment 1");
    setup(&b).expect("set up environment 2");
    assert_eq!(
        (a.ns_addr, b.ns_addr),
        ("10.213.0.2".parse().unwrap(), "10.213.0.6".parse().unwrap())
    );

    // What a VM would find: a persistent TAP with the gateway's address, in each namespace.
    for net in [&a, &b] {
        let link = ip_output(&["-n", &net.netns, "-d", "link", "show", "tap0"]);
        assert!(link.contains("tun type tap"), "{link}");
        assert!(
            link.contains("vnet_hdr on") && link.contains("persist on"),
            "{link}"
        );
        let addr = ip_output(&["-n", &net.netns, "-o", "addr", "show", "dev", "tap0"]);
        assert!(addr.contains("172.16.0.1/30"), "{addr}");
    }
    // Setting up again (a leftover of a crash) starts over cleanly.
    setup(&a).expect("set up environment 1 again");

    stand_in_guest(&a);
    stand_in_guest(&b);
    guest_server(&a, "guest of environment 1");
    guest_server(&b, "guest of environment 2");

    // Each environment's address on the host reaches its own guest, the same address in both.
    let guest_port = |net: &EnvNetwork| SocketAddr::from((net.ns_addr, GUEST_PORT));
    assert_eq!(banner_at(guest_port(&a)).unwrap(), "guest of environment 1");
    assert_eq!(banner_at(guest_port(&b)).unwrap(), "guest of environment 2");

    // Published ports: the daemon's proxies on 127.0.0.1.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (pa, pb) = runtime.block_on(async {
        (
            PortProxy::start(local, None, guest_port(&a)).unwrap(),
            PortProxy::start(local, None, guest_port(&b)).unwrap(),
        )
    });
    let through = |addr: SocketAddr| {
        runtime.block_on(async move {
            tokio::task::spawn_blocking(move || banner_at(addr))
                .await
                .unwrap()
        })
    };
    assert_eq!(through(pa.host_addr()).unwrap(), "guest of environment 1");
    assert_eq!(through(pb.host_addr()).unwrap(), "guest of environment 2");
    assert_eq!(through(pa.host_addr()).unwrap(), "guest of environment 1");

    // Outbound: environment 1 may go out (as its namespace's address), environment 2 may not.
    assert_eq!(from_guest(&a, outside_addr).unwrap(), "outside");
    let denied = from_guest(&b, outside_addr);
    assert!(
        denied.is_err(),
        "environment 2 reached {outside_addr}: {denied:?}"
    );
    let host_side = SocketAddr::from((b.host_addr, outside_addr.port()));
    assert!(from_guest(&b, host_side).is_err(), "nor its host side");
    // Not even one way (a TCP handshake could not finish anyway without the SNAT back).
    datagram_from_guest(&a, outside_udp_addr, b"from 1");
    datagram_from_guest(&b, outside_udp_addr, b"from 2");
    assert_eq!(received(&outside_udp), [b"from 1".to_vec()]);
    // Environments do not reach each other through the host, even with outbound allowed.
    let other = from_guest(&a, guest_port(&b));
    assert!(
        other.is_err(),
        "environment 1 reached environment 2: {other:?}"
    );
    // A denied guest still answers inbound connections (replies pass).
    assert_eq!(through(pb.host_addr()).unwrap(), "guest of environment 2");

    // Teardown removes the namespace and the host's veth end; twice is harmless.
    drop((pa, pb));
    for net in [&a, &b] {
        ip(&["netns", "delete", &guest_ns(net)]);
        teardown(net).unwrap();
        teardown(net).unwrap();
        assert!(!netns_exists(&net.netns));
        let links = ip_output(&["-o", "link", "show"]);
        assert!(!links.contains(&format!("{}:", net.veth)), "{links}");
    }
}
