//! End to end with the real image, through a real `groved` and its HTTP API: create `main`,
//! write data in it, branch `feature-x` from it, see the data there and that writes in
//! `feature-x` do not reach `main`, `sync` `feature-x` to see `main`'s newer data, restart
//! the daemon with both VMs running (they are re-attached), delete both, and find nothing
//! left behind: no processes, no files, no rows.

mod e2e_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use e2e_support::*;
use serde_json::json;

#[test]
fn main_branch_sync_restart_and_delete() {
    let mut world = World::start("api");
    let (data, sock) = (world.data.clone(), world.sock.clone());
    let daemon = world.daemon.take().expect("the daemon");
    let (status, body) = json_req(
        &sock,
        "POST",
        "/v1/environments",
        json!({"name": "main", "image": "default", "memory_mib": 256}),
    );
    assert_eq!(status, 201, "{body}");
    wait_console(&sock, "main", "GROVE-INIT-READY");
    type_line(
        &sock,
        "main",
        "echo main-data-1 > /data.txt; sync; echo W1-$((1+1))",
    );
    wait_console(&sock, "main", "W1-2");

    // The other routes on the real daemon: image in use, pause/resume, snapshot, metrics,
    // and the event stream (read on a thread while the branch below happens).
    assert_eq!(get(&sock, "/v1/images/default").0, 200);
    let (status, _) = http(
        &sock,
        "DELETE",
        "/v1/images/default",
        None,
        "application/json",
    );
    assert_eq!(status, 409, "main uses the image");
    let (status, body) = http(
        &sock,
        "POST",
        "/v1/environments/main/pause",
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(get(&sock, "/v1/environments/main").1["state"], "paused");
    let (status, _) = http(
        &sock,
        "POST",
        "/v1/environments/main/pause",
        None,
        "application/json",
    );
    assert_eq!(status, 409, "already paused");
    let (status, _) = http(
        &sock,
        "POST",
        "/v1/environments/main/resume",
        None,
        "application/json",
    );
    assert_eq!(status, 200);
    let (status, body) = http(
        &sock,
        "POST",
        "/v1/environments/main/snapshot",
        None,
        "application/json",
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let (status, metrics) = http(&sock, "GET", "/metrics", None, "text/plain");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&metrics).contains("grove_environments{state=\"running\"} 1"));
    let events = {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: grove\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("\"feature-x\"") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        })
    };

    let (status, body) = json_req(
        &sock,
        "POST",
        "/v1/environments",
        json!({"name": "feature-x", "from": "main"}),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["environment"]["parent"], "main");
    eprintln!("branch timings: {}", body["branch"]);
    let events = events.join().unwrap();
    assert!(events.contains("text/event-stream"), "{events}");
    assert!(events.contains("\"feature-x\""), "{events}");
    assert!(body["branch"]["parent_pause_ms"].as_f64().is_some());

    // Two more branches of main requested at once: both succeed, each from its own snapshot.
    let branches: Vec<_> = ["feature-y", "feature-z"]
        .into_iter()
        .map(|name| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                json_req(
                    &sock,
                    "POST",
                    "/v1/environments",
                    json!({"name": name, "from": "main"}),
                )
            })
        })
        .collect();
    let mut snapshots = Vec::new();
    for b in branches {
        let (status, body) = b.join().unwrap();
        assert_eq!(status, 201, "{body}");
        snapshots.push(body["environment"]["snapshot"].clone());
    }
    assert_ne!(snapshots[0], snapshots[1]);
    for name in ["feature-y", "feature-z"] {
        type_line(&sock, name, &format!("echo {name}-SEES-$(cat /data.txt)"));
        wait_console(&sock, name, &format!("{name}-SEES-main-data-1"));
        let (status, out) = http(
            &sock,
            "DELETE",
            &format!("/v1/environments/{name}"),
            None,
            "application/json",
        );
        assert_eq!(status, 204, "{}", String::from_utf8_lossy(&out));
    }

    type_line(&sock, "feature-x", "echo FX-$(cat /data.txt)");
    wait_console(&sock, "feature-x", "FX-main-data-1");
    type_line(
        &sock,
        "feature-x",
        "echo fx-wrote > /data.txt; sync; echo W2-$((2+2))",
    );
    wait_console(&sock, "feature-x", "W2-4");
    type_line(&sock, "main", "echo M-$(cat /data.txt)");
    wait_console(&sock, "main", "M-main-data-1");
    type_line(
        &sock,
        "main",
        "echo main-data-2 > /data.txt; sync; echo W3-$((3+3))",
    );
    wait_console(&sock, "main", "W3-6");

    let (status, body) = http(
        &sock,
        "POST",
        "/v1/environments/feature-x/sync",
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    type_line(&sock, "feature-x", "echo FS-$(cat /data.txt)");
    wait_console(&sock, "feature-x", "FS-main-data-2");

    // A daemon restart re-attaches to both VMs.
    let (_, before) = get(&sock, "/v1/environments");
    daemon.stop();
    assert_eq!(vms_under(&data).len(), 2, "the VMMs outlive the daemon");
    let daemon = Daemon::start(&data, &sock);
    let (_, after) = get(&sock, "/v1/environments");
    assert_eq!(before, after);
    type_line(&sock, "main", "echo AGAIN-$((4+4))");
    wait_console(&sock, "main", "AGAIN-8");

    let (status, _) = http(
        &sock,
        "DELETE",
        "/v1/environments/main",
        None,
        "application/json",
    );
    assert_eq!(status, 409, "feature-x depends on main's layers");
    for env in ["feature-x", "main"] {
        let (status, out) = http(
            &sock,
            "DELETE",
            &format!("/v1/environments/{env}"),
            None,
            "application/json",
        );
        assert_eq!(status, 204, "{}", String::from_utf8_lossy(&out));
    }
    let (_, list) = get(&sock, "/v1/environments");
    assert_eq!(list, json!([]));
    assert!(vmms_under(&data).is_empty(), "no VMM left");
    let left: Vec<PathBuf> = files_under(&data)
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("grove.db")
        })
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    daemon.stop();
}
