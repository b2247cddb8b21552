//! Addresses, names, rulesets and published ports; no root needed. The namespaces
//! themselves are exercised in `api/tests/network_namespaces.rs` (root only).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[test]
fn pools_parse_and_hand_out_one_slash_30_per_environment() {
    let pool: Ipv4Net = "10.213.0.0/16".parse().unwrap();
    assert_eq!(pool.to_string(), "10.213.0.0/16");
    assert_eq!(pool.slots(), 16384);
    assert_eq!("192.168.7.0/30".parse::<Ipv4Net>().unwrap().slots(), 1);
    for bad in [
        "10.213.0.0",
        "10.213.0.0/31",
        "10.213.0.1/16",
        "10.213.0.0/x",
        "/16",
        "x/8",
    ] {
        assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
    }

    let config = NetworkConfig::default();
    let net = config.env_network(7, 0, true).unwrap();
    assert_eq!(net.netns, "grove-7");
    assert_eq!(net.veth, "gv7");
    assert_eq!(net.host_addr, Ipv4Addr::new(10, 213, 0, 1));
    assert_eq!(net.ns_addr, Ipv4Addr::new(10, 213, 0, 2));
    let net = config.env_network(8, 300, false).unwrap();
    assert_eq!(net.ns_addr, Ipv4Addr::new(10, 213, 4, 178));
    assert!(!net.allow_outbound);
    let last = config.env_network(9, 16383, true).unwrap();
    assert_eq!(last.ns_addr, Ipv4Addr::new(10, 213, 255, 254));
    assert!(matches!(
        config.env_network(9, 16384, true),
        Err(NetworkError::PoolFull { slots: 16384, .. })
    ));
    assert!(matches!(
        config.env_network(1_000_000_000_000_000, 0, true),
        Err(NetworkError::IfName(_))
    ));
    assert_eq!(config.env_id_of("grove-12"), Some(12));
    assert_eq!(config.env_id_of("grove-x"), None);
    assert_eq!(config.env_id_of("other-12"), None);
    assert_eq!(config.host_table(), "grove_gv");
    config.validate().unwrap();
    for (netns, veth) in [
        ("", "gv"),
        ("grove-", ""),
        ("a/b", "gv"),
        ("grove-", "veth-prefix"),
        ("x", "g v"),
    ] {
        let bad = NetworkConfig {
            netns_prefix: netns.into(),
            veth_prefix: veth.into(),
            ..NetworkConfig::default()
        };
        assert!(
            matches!(bad.validate(), Err(NetworkError::Prefix { .. })),
            "{netns:?} {veth:?}"
        );
    }
}

#[test]
fn the_lowest_free_slot_is_taken() {
    assert_eq!(first_free_slot(&[], 4), Some(0));
    assert_eq!(first_free_slot(&[0, 1, 3], 4), Some(2));
    assert_eq!(first_free_slot(&[3, 1, 0, 1], 4), Some(2));
    assert_eq!(first_free_slot(&[1, 2], 4), Some(0));
    assert_eq!(first_free_slot(&[0, 1, 2, 3], 4), None);
    assert_eq!(first_free_slot(&[0], 1), None);
}

#[test]
fn the_namespace_ruleset_follows_the_outbound_choice() {
    let config = NetworkConfig::default();
    let allowed = config.env_network(1, 0, true).unwrap().ruleset();
    assert!(allowed.contains("iifname \"veth0\" ip daddr 10.213.0.2 dnat to 172.16.0.2"));
    assert!(allowed.contains("oifname \"veth0\" ip saddr 172.16.0.2 snat to 10.213.0.2"));
    assert!(!allowed.contains("outbound denied"));
    let denied = config.env_network(1, 0, false).unwrap().ruleset();
    assert!(!denied.contains("snat"));
    let established = denied.find("ct state established,related accept").unwrap();
    let drop = denied.find("iifname \"tap0\" drop").unwrap();
    assert!(
        established < drop,
        "replies to inbound connections pass first"
    );
    // Spoofed sources never leave, whatever the choice.
    for r in [&allowed, &denied] {
        assert!(r.contains("iifname \"tap0\" ip saddr != 172.16.0.2 drop"));
        assert!(r.starts_with("table ip grove\ndelete table ip grove\n"));
    }
}

/// A TCP server on 127.0.0.1 that writes `banner` and then echoes.
async fn echo_server(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(banner).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
        }
    });
    addr
}

async fn talk(addr: SocketAddr, banner_len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut got = vec![0u8; banner_len + 4];
    s.write_all(b"ping").await.unwrap();
    s.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn a_published_port_carries_connections_both_ways_until_dropped() {
    let target = echo_server(b"A:").await;
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let proxy = PortProxy::start(bind, None, target).unwrap();
    let host = proxy.host_addr();
    assert_ne!(host.port(), 0);
    assert_ne!(host.port(), target.port());
    // Several connections, concurrently.
    let (a, b) = tokio::join!(talk(host, 2), talk(host, 2));
    assert_eq!(
        (a.as_slice(), b.as_slice()),
        (&b"A:ping"[..], &b"A:ping"[..])
    );
    // An open connection and the listener close with the proxy.
    let mut open = TcpStream::connect(host).await.unwrap();
    let mut banner = [0u8; 2];
    open.read_exact(&mut banner).await.unwrap();
    drop(proxy);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the open connection ended with the proxy");
    assert!(
        TcpStream::connect(host).await.is_err(),
        "nothing listens any more"
    );
}

#[tokio::test]
async fn ports_come_from_the_configured_range_and_unreachable_targets_close() {
    // A range whose first port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let first = taken.local_addr().unwrap().port();
    let range = first..=first.saturating_add(20);
    let unreachable: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let proxy = PortProxy::start(bind, Some(&range), unreachable).unwrap();
    assert!(range.contains(&proxy.host_addr().port()));
    assert_ne!(proxy.host_addr().port(), first);
    let mut s = TcpStream::connect(proxy.host_addr()).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("closed promptly");
    assert_eq!(n.map(|_| buf.len()).unwrap_or(0), 0);
    // A full range is an error that says so.
    let one = first..=first;
    let e = PortProxy::start(bind, Some(&one), unreachable).unwrap_err();
    assert!(e.to_string().contains("is taken"), "{e}");
}

#[test]
fn proxies_are_kept_per_environment() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let target: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let proxies = Proxies::default();
        let p = PortProxy::start(bind, None, target).unwrap();
        let addr = p.host_addr();
        proxies.insert(3, 8080, p);
        assert!(proxies.contains(3, 8080));
        assert!(!proxies.contains(3, 8081) && !proxies.contains(4, 8080));
        proxies.remove(3);
        assert!(!proxies.contains(3, 8080));
        assert!(TcpStream::connect(addr).await.is_err());
    });
}
