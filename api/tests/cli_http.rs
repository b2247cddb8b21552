//! The client and `grove` against the real HTTP layer (`grove_api::http`) serving the
//! in-memory service of the `http_*` tests: the contract between the two sides of the wire,
//! checked end to end (routing of `/`-names, error bodies, bearer tokens, both streams).

mod http_support;

use std::process::Output;
use std::time::Duration;

use grove_api::client::{Client, ClientError};
use grove_api::model::{CreateEnvironment, CreateImage, EnvState};
use http_support::{Server, TOKEN};

fn branch(name: &str, from: &str) -> CreateEnvironment {
    CreateEnvironment {
        name: name.into(),
        image: None,
        from: Some(from.into()),
        vcpus: None,
        memory_mib: None,
        agent: None,
        publish: Vec::new(),
        allow_outbound: None,
        snapshot_mode: None,
    }
}

async fn grove(server: &Server, args: &[&str]) -> Output {
    let socket = server.socket.to_str().expect("UTF-8 temp path");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_grove"));
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("GROVE_SOCKET")
        .env_remove("GROVE_TOKEN")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grove finished in time")
        .expect("run grove")
}

#[tokio::test]
async fn client_against_the_http_layer() {
    let server = Server::start().await;
    let c = Client::unix(&server.socket);

    assert_eq!(c.list_images().await.map(|i| i.len()).ok(), Some(1));
    let build = CreateImage {
        name: "built".into(),
        kernel: None,
        rootfs: None,
        initrd: None,
        build: Some("default".into()),
    };
    assert_eq!(
        c.create_image(&build).await.map(|i| i.name).ok(),
        Some("built".into())
    );
    assert!(c.get_image("built").await.is_ok());
    assert!(c.delete_image("built").await.is_ok());

    let created = c
        .create_environment(&branch("feature/x", "main"))
        .await
        .expect("branch");
    assert!(created.branch.is_some());
    assert_eq!(created.environment.parent.as_deref(), Some("main"));
    let got = c.get_environment("feature/x").await.expect("get feature/x");
    assert_eq!(got.name, "feature/x");
    assert_eq!(
        c.pause("feature/x").await.map(|e| e.state).ok(),
        Some(EnvState::Paused)
    );
    assert_eq!(
        c.resume("feature/x").await.map(|e| e.state).ok(),
        Some(EnvState::Running)
    );
    assert!(c.snapshot("feature/x").await.is_ok());
    assert!(c.sync("feature/x").await.is_ok());

    // A name whose last part is an action is not taken for the action.
    c.create_environment(&branch("x/pause", "main"))
        .await
        .expect("create x/pause");
    assert_eq!(
        c.get_environment("x/pause").await.map(|e| e.name).ok(),
        Some("x/pause".into())
    );
    assert_eq!(
        c.pause("x/pause").await.map(|e| e.state).ok(),
        Some(EnvState::Paused)
    );
    assert!(c.delete_environment("x/pause", false).await.is_ok());

    let err = c
        .delete_environment("main", false)
        .await
        .expect_err("children");
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));
    let err = c.get_environment("nope").await.expect_err("missing");
    assert_eq!((err.status(), err.code()), (Some(404), Some("not_found")));
    let err = c.get_environment("../etc").await.expect_err("bad name");
    assert_eq!((err.status(), err.code()), (Some(400), Some("bad_request")));
    assert!(c.delete_environment("feature/x", false).await.is_ok());

    assert_eq!(c.console("main", 0).await.ok(), Some("boot ok\n".into()));
    assert_eq!(c.console("main", 5).await.ok(), Some("ok\n".into()));
    // The fake service has no console input: the request got through routing, the
    // content-type check and the name, and the service's own answer came back.
    let err = c
        .console_input("main", b"ls\n")
        .await
        .expect_err("not in the fake");
    assert_eq!(
        err.to_string(),
        "console input is not supported here (404 not_found)"
    );
    assert!(c.health().await.is_ok_and(|h| h.contains("ok")));
    assert!(c.metrics().await.is_ok_and(|m| m.contains("grove_vms")));
}

#[tokio::test]
async fn streams_against_the_http_layer() {
    let server = Server::start().await;
    let c = Client::unix(&server.socket);

    let mut console = c.console_follow("main", 5).await.expect("follow");
    server.fake.append_console("main", b"more\n");
    let mut seen = Vec::new();
    while !seen.ends_with(b"ok\nmore\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), console.next())
            .await
            .expect("console output in time")
            .expect("the stream stays open")
            .expect("a chunk");
        seen.extend_from_slice(&chunk);
    }
    assert_eq!(seen, b"ok\nmore\n");

    let mut events = c.events().await.expect("events");
    server
        .fake
        .emit("environment", "main", "state", Some(EnvState::Paused));
    // Keep-alive comments may come first; they are not events.
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event in time")
        .expect("the stream stays open")
        .expect("an event");
    assert_eq!(
        (event.name.as_str(), event.state),
        ("main", Some(EnvState::Paused))
    );
}

#[tokio::test]
async fn tcp_needs_the_token() {
    let server = Server::start().await;
    let url = format!("http://{}", server.tcp);
    let good = Client::tcp(&url, Some(TOKEN)).expect("valid URL");
    assert!(good.list_environments().await.is_ok());
    for token in [None, Some("wrong")] {
        let bad = Client::tcp(&url, token).expect("valid URL");
        let err = bad.list_environments().await.expect_err("unauthorized");
        assert!(
            matches!(err, ClientError::Api { status: 401, .. }),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn grove_against_the_http_layer() {
    let server = Server::start().await;
    let out = grove(&server, &["branch", "feature/x", "--from", "main"]).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("branched feature/x from main: running"),
        "{text}"
    );
    assert!(text.contains("main paused for 12.5 ms"), "{text}");

    let out = grove(&server, &["ls"]).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split("  ").next())
        .collect();
    assert_eq!(names, ["main", "└─ feature/x"], "{text}");

    let out = grove(&server, &["rm", "main"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("(409 conflict)"), "{err}");

    let out = grove(&server, &["--json", "show", "feature/x"]).await;
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["parent"], "main");

    let out = grove(&server, &["console", "main"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"boot ok\n");
}
