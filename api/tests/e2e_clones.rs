//! End to end with the real image, through a real `groved`, its HTTP API and the `grove`
//! CLI: a booted environment is reached through its guest agent (`grove exec`, files), and
//! every clone is made unique before it is reported ready. Ten clones of one paused state
//! each read 32 bytes from `/dev/urandom` right after becoming ready, and all ten differ;
//! each clone's hostname is its environment's name, its post-clone hook ran, and its VM
//! generation ID (ACPI VMGenID) is new: different from its parent's and every other
//! clone's, both as the VMM reports it and as the guest reads it from memory.

mod e2e_support;

use std::collections::HashSet;

use e2e_support::*;
use serde_json::{json, Value};

#[test]
fn exec_files_and_ten_unique_clones() {
    let w = World::start("clones");
    let sock = &w.sock;
    let (status, body) = json_req(
        sock,
        "POST",
        "/v1/environments",
        json!({"name": "main", "image": "default", "memory_mib": 256}),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ready"]["hostname"], "main", "{body}");
    assert_eq!(body["ready"]["reseeded"], false, "{body}");

    // `grove exec`: output on stdout and stderr, the command's status as grove's.
    let out = grove(
        sock,
        &[
            "exec",
            "main",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    let out = grove(sock, &["exec", "-i", "main", "--", "cat"], b"piped in");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "piped in");
    assert_eq!(
        exec(sock, "main", &["cat", "/proc/sys/kernel/hostname"]),
        (Some(0), b"main\n".to_vec())
    );

    // Files both ways; a post-clone hook that leaves a mark and prints the hostname it saw.
    let hook = b"#!/bin/sh\necho \"hook saw $(cat /proc/sys/kernel/hostname)\" > /run/hook-ran\n";
    let out = grove(
        sock,
        &[
            "file",
            "put",
            "main",
            "/etc/grove/hooks.d/10-mark",
            "--mode",
            "755",
        ],
        hook,
    );
    assert!(out.status.success(), "{out:?}");
    let out = grove(
        sock,
        &["file", "get", "main", "/etc/grove/hooks.d/10-mark"],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, hook);
    let out = grove(sock, &["file", "get", "main", "/no/such/file"], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The generation ID as the guest reads it, through /dev/mem (it lies below 1 MiB).
    let main_pid = body["environment"]["pid"].as_u64().expect("main's pid");
    let main_genid = vmm_status(main_pid).vmgenid.expect("a VMGenID");
    let read_genid = |env: &str, addr: u64| {
        let skip = format!("skip={}", addr / 16);
        let (code, bytes) = exec(
            sock,
            env,
            &[
                "dd",
                "if=/dev/mem",
                "bs=16",
                &skip,
                "count=1",
                "status=none",
            ],
        );
        assert_eq!(code, Some(0), "{env}: reading the VMGenID");
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(read_genid("main", main_genid.addr), main_genid.id);

    // Ten clones of one state: main is paused, so every snapshot holds the same memory.
    let mut genids = HashSet::from([main_genid.id.clone()]);
    let (status, body) = http(
        sock,
        "POST",
        "/v1/environments/main/pause",
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", text(&body));
    let mut randoms = HashSet::new();
    for i in 0..10 {
        let name = format!("clone-{i}");
        let out = grove(sock, &["--json", "branch", &name, "--from", "main"], b"");
        assert!(out.status.success(), "branch {name}: {out:?}");
        let created: Value = serde_json::from_slice(&out.stdout).expect("grove --json");
        let ready = &created["ready"];
        assert_eq!(ready["hostname"], name.as_str(), "{created}");
        assert_eq!(ready["reseeded"], true, "{created}");
        assert_eq!(ready["hooks"][0]["name"], "10-mark", "{created}");
        assert_eq!(ready["hooks"][0]["exit_code"], 0, "{created}");

        // Right after becoming ready.
        let (code, random) = exec(
            sock,
            &name,
            &["dd", "if=/dev/urandom", "bs=32", "count=1", "status=none"],
        );
        assert_eq!((code, random.len()), (Some(0), 32), "{name}");
        assert!(
            randoms.insert(random),
            "{name} read the same random bytes as another clone"
        );

        assert_eq!(
            exec(sock, &name, &["cat", "/proc/sys/kernel/hostname"]),
            (Some(0), format!("{name}\n").into_bytes())
        );
        assert_eq!(
            exec(sock, &name, &["cat", "/run/hook-ran"]),
            (Some(0), format!("hook saw {name}\n").into_bytes())
        );

        // A new generation ID, and the guest sees it.
        let pid = created["environment"]["pid"]
            .as_u64()
            .expect("the clone's pid");
        let genid = vmm_status(pid).vmgenid.expect("a VMGenID");
        assert_eq!(genid.addr, main_genid.addr);
        assert!(
            genids.insert(genid.id.clone()),
            "{name} kept a generation ID"
        );
        assert_eq!(read_genid(&name, genid.addr), genid.id, "{name}");
    }
    assert_eq!(genids.len(), 11);
    assert_eq!(randoms.len(), 10);

    // main never ran a hook and still has its own name.
    let (status, body) = http(
        sock,
        "POST",
        "/v1/environments/main/resume",
        None,
        "application/json",
    );
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(
        exec(sock, "main", &["cat", "/proc/sys/kernel/hostname"]),
        (Some(0), b"main\n".to_vec())
    );
    assert_eq!(exec(sock, "main", &["cat", "/run/hook-ran"]).0, Some(1));

    for i in 0..10 {
        let (status, _) = http(
            sock,
            "DELETE",
            &format!("/v1/environments/clone-{i}"),
            None,
            "application/json",
        );
        assert_eq!(status, 204);
    }
    let (status, _) = http(
        sock,
        "DELETE",
        "/v1/environments/main",
        None,
        "application/json",
    );
    assert_eq!(status, 204);
    assert!(vmms_under(&w.data).is_empty(), "every VMM stopped");
}
