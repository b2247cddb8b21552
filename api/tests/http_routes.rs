//! Every route and every error code of the HTTP layer, over a real Unix socket and a real
//! TCP port, against an in-memory service.

mod http_support;

use std::time::Duration;

use grove_api::model::{Environment, EnvironmentCreated, Event, Image, Snapshot};
use http_body_util::BodyExt;
use http_support::{post_json, raw, read_until, request, send, Server, TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT: Duration = Duration::from_secs(5);

fn parse<T: serde::de::DeserializeOwned>(reply: &http_support::Reply) -> T {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
        panic!(
            "status {}: {e}: {:?}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )
    })
}

#[tokio::test]
async fn health_over_unix_needs_no_token() {
    let server = Server::start().await;
    let reply = request(&server.unix(), "GET", "/healthz", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn images_list_create_get_delete() {
    let server = Server::start().await;
    let unix = server.unix();

    let reply = request(&unix, "GET", "/v1/images", &[], None).await;
    assert_eq!(reply.status, 200);
    let images: Vec<Image> = parse(&reply);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].name, "base");

    let reply = post_json(
        &unix,
        "/v1/images",
        r#"{"name": "tools/v2", "kernel": "/k", "rootfs": "/r"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("location"), Some("/v1/images/tools/v2"));
    let image: Image = parse(&reply);
    assert_eq!(image.name, "tools/v2");

    let reply = post_json(
        &unix,
        "/v1/images",
        r#"{"name": "built", "build": "default"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);

    let reply = request(&unix, "GET", "/v1/images/tools/v2", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(parse::<Image>(&reply), image);
    let reply = request(&unix, "GET", "/v1/images/tools%2Fv2", &[], None).await;
    assert_eq!(reply.status, 200);

    let reply = request(&unix, "DELETE", "/v1/images/tools/v2", &[], None).await;
    assert_eq!(reply.status, 204);
    assert!(reply.body.is_empty());
    let reply = request(&unix, "GET", "/v1/images/tools/v2", &[], None).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error_code(), "not_found");
}

#[tokio::test]
async fn environments_create_branch_list_get_delete() {
    let server = Server::start().await;
    let unix = server.unix();

    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "solo", "image": "base", "vcpus": 2, "memory_mib": 256}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("location"), Some("/v1/environments/solo"));
    let created: EnvironmentCreated = parse(&reply);
    assert_eq!(created.environment.name, "solo");
    assert!(created.branch.is_none());

    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "feature/x", "from": "main"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    let created: EnvironmentCreated = parse(&reply);
    assert_eq!(created.environment.parent.as_deref(), Some("main"));
    let timings = created.branch.expect("branch timings");
    assert_eq!(timings.parent_pause_ms, 12.5);

    let reply = request(&unix, "GET", "/v1/environments", &[], None).await;
    assert_eq!(reply.status, 200);
    let names: Vec<String> = parse::<Vec<Environment>>(&reply)
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["feature/x", "main", "solo"]);

    let reply = request(&unix, "GET", "/v1/environments/feature/x", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(parse::<Environment>(&reply).name, "feature/x");

    // `main` has a child: deleting it needs force.
    let reply = request(&unix, "DELETE", "/v1/environments/main", &[], None).await;
    assert_eq!(reply.status, 409);
    assert_eq!(reply.error_code(), "conflict");
    let reply = request(
        &unix,
        "DELETE",
        "/v1/environments/main?force=false",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 409);
    let reply = request(
        &unix,
        "DELETE",
        "/v1/environments/main?force=true",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 204);
    let reply = request(&unix, "DELETE", "/v1/environments/feature/x", &[], None).await;
    assert_eq!(reply.status, 204);
    let reply = request(&unix, "GET", "/v1/environments/feature/x", &[], None).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn environment_actions() {
    let server = Server::start().await;
    let unix = server.unix();
    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "f/1", "from": "main"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);

    let reply = request(&unix, "POST", "/v1/environments/f/1/pause", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        parse::<Environment>(&reply).state,
        grove_api::model::EnvState::Paused
    );
    let reply = request(&unix, "POST", "/v1/environments/f/1/pause", &[], None).await;
    assert_eq!(reply.status, 409, "pausing twice");
    assert_eq!(reply.error_code(), "conflict");
    let reply = request(&unix, "POST", "/v1/environments/f/1/resume", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        parse::<Environment>(&reply).state,
        grove_api::model::EnvState::Running
    );

    let reply = request(&unix, "POST", "/v1/environments/f/1/snapshot", &[], None).await;
    assert_eq!(reply.status, 201);
    let snapshot: Snapshot = parse(&reply);
    assert_eq!(snapshot.environment, "f/1");
    assert_eq!(snapshot.pause_ms, 0.25, "live by default");
    let path = "/v1/environments/f/1/snapshot?mode=paused";
    let reply = request(&unix, "POST", path, &[], None).await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        parse::<Snapshot>(&reply).pause_ms,
        7.25,
        "the query chose paused"
    );
    let path = "/v1/environments/f/1/snapshot?mode=fast";
    let reply = request(&unix, "POST", path, &[], None).await;
    assert_eq!(reply.status, 400);
    let reply = post_json(
        &unix,
        "/v1/environments?mode=paused",
        r#"{"name": "f/paused", "from": "main"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    let created: EnvironmentCreated = parse(&reply);
    assert_eq!(
        created.branch.map(|b| b.snapshot_mode),
        Some(grove_api::model::SnapshotMode::Paused)
    );
    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "f/body", "from": "main", "snapshot_mode": "paused"}"#,
    )
    .await;
    assert_eq!(
        reply.status, 400,
        "the mode is a query parameter, not a body field"
    );

    let reply = request(&unix, "POST", "/v1/environments/f/1/sync", &[], None).await;
    assert_eq!(reply.status, 200);
    let synced: EnvironmentCreated = parse(&reply);
    assert_eq!(synced.environment.name, "f/1");
    assert!(synced.branch.is_some());
    let reply = request(&unix, "POST", "/v1/environments/main/sync", &[], None).await;
    assert_eq!(reply.status, 409, "main has no parent");

    // An environment whose last part is an action's name: its `/` is sent as `%2F`.
    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "x/pause", "from": "main"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    let reply = request(&unix, "GET", "/v1/environments/x%2Fpause", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(parse::<Environment>(&reply).name, "x/pause");
    let reply = request(&unix, "POST", "/v1/environments/x%2Fpause/pause", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(parse::<Environment>(&reply).name, "x/pause");
}

#[tokio::test]
async fn console_from_an_offset() {
    let server = Server::start().await;
    let unix = server.unix();
    let reply = request(&unix, "GET", "/v1/environments/main/console", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.body, b"boot ok\n");
    assert_eq!(reply.header("grove-next-offset"), Some("8"));

    let reply = request(
        &unix,
        "GET",
        "/v1/environments/main/console?offset=5",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.body, b"ok\n");
    let reply = request(
        &unix,
        "GET",
        "/v1/environments/main/console?offset=1&limit=3",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.body, b"oot");
    assert_eq!(reply.header("grove-next-offset"), Some("4"));
    let reply = request(
        &unix,
        "GET",
        "/v1/environments/main/console?offset=99",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());

    let reply = request(&unix, "GET", "/v1/environments/nope/console", &[], None).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn console_follow_streams_until_the_environment_is_gone() {
    let server = Server::start().await;
    let unix = server.unix();
    let response = send(
        &unix,
        "GET",
        "/v1/environments/main/console?offset=5&follow=true",
        &[],
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let seen = read_until(&mut body, "ok\n", SHORT).await;
    assert_eq!(seen, "ok\n");

    server.fake.append_console("main", b"line two\n");
    let seen = read_until(&mut body, "line two\n", SHORT).await;
    assert_eq!(seen, "line two\n");
    server.fake.append_console("main", b"three\n");
    let seen = read_until(&mut body, "three\n", SHORT).await;
    assert_eq!(seen, "three\n");

    // Deleting the environment ends the stream.
    let reply = request(&unix, "DELETE", "/v1/environments/main", &[], None).await;
    assert_eq!(reply.status, 204);
    let rest = tokio::time::timeout(SHORT, body.collect())
        .await
        .expect("the stream ends")
        .expect("it ends cleanly");
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn console_follow_stops_polling_when_the_client_leaves() {
    let server = Server::start().await;
    let response = send(
        &server.unix(),
        "GET",
        "/v1/environments/main/console?follow=true",
        &[],
        None,
    )
    .await;
    let mut body = response.into_body();
    read_until(&mut body, "boot ok\n", SHORT).await;
    drop(body);
    // Polling every 20 ms: once the disconnect is seen, the count stops growing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = server
        .fake
        .console_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = server
        .fake
        .console_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(calls, later, "still polling for a client that left");
}

#[tokio::test]
async fn events_stream_delivers_events_and_keep_alives() {
    let server = Server::start().await;
    let response = send(&server.unix(), "GET", "/v1/events", &[], None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut body = response.into_body();

    // The subscription exists once the head has arrived.
    let reply = post_json(
        &server.unix(),
        "/v1/environments",
        r#"{"name": "evt", "image": "base"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    let seen = read_until(&mut body, "\n\n", SHORT).await;
    let data = seen
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {seen:?}"));
    let event: Event = serde_json::from_str(data).expect("an Event");
    assert_eq!(
        (
            event.kind.as_str(),
            event.name.as_str(),
            event.action.as_str()
        ),
        ("environment", "evt", "created")
    );

    // The keep-alive comes every 200 ms in these tests.
    let seen = read_until(&mut body, ": keep-alive\n\n", SHORT).await;
    assert!(seen.ends_with(": keep-alive\n\n"), "{seen:?}");

    drop(body);
    let deadline = tokio::time::Instant::now() + SHORT;
    while server.fake.subscribers() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_include_the_service_and_request_counts() {
    let server = Server::start().await;
    let unix = server.unix();
    for _ in 0..3 {
        assert_eq!(
            request(&unix, "GET", "/healthz", &[], None).await.status,
            200
        );
    }
    assert_eq!(request(&unix, "GET", "/nope", &[], None).await.status, 404);
    let reply = request(&unix, "GET", "/metrics", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body).expect("UTF-8");
    assert!(text.contains("grove_vms 1\n"), "{text}");
    assert!(
        text.contains("grove_api_requests_total{status=\"200\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("grove_api_requests_total{status=\"404\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("grove_api_request_duration_seconds_count 4\n"),
        "{text}"
    );
    assert!(
        text.contains("grove_api_request_duration_seconds_sum "),
        "{text}"
    );
}

#[tokio::test]
async fn tcp_needs_the_bearer_token() {
    let server = Server::start().await;
    let tcp = server.tcp();
    let good = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    let lower = format!("bearer {TOKEN}");
    let basic = format!("Basic {TOKEN}");

    for (path, headers) in [
        ("/healthz", vec![]),
        ("/healthz", vec![("authorization", wrong.as_str())]),
        ("/healthz", vec![("authorization", basic.as_str())]),
        ("/healthz", vec![("authorization", "Bearer")]),
        ("/v1/environments", vec![]),
        // No route information without the token.
        ("/no/such/route", vec![]),
    ] {
        let reply = request(&tcp, "GET", path, &headers, None).await;
        assert_eq!(reply.status, 401, "{path} {headers:?}");
        assert_eq!(reply.error_code(), "unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    for auth in [&good, &lower] {
        let headers = [("authorization", auth.as_str())];
        let reply = request(&tcp, "GET", "/healthz", &headers, None).await;
        assert_eq!(reply.status, 200);
        let reply = request(&tcp, "GET", "/v1/environments/main", &headers, None).await;
        assert_eq!(reply.status, 200);
        let reply = request(&tcp, "GET", "/no/such/route", &headers, None).await;
        assert_eq!(reply.status, 404);
    }
    // The Unix socket ignores whatever token it is given.
    let reply = request(
        &server.unix(),
        "GET",
        "/healthz",
        &[("authorization", "Bearer whatever")],
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let server = Server::start().await;
    let unix = server.unix();
    let bodies = [
        ("/v1/environments", "{"),
        ("/v1/environments", "not json"),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base"} trailing"#,
        ),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base", "colour": "red"}"#,
        ),
        ("/v1/environments", r#"{"name": 5, "image": "base"}"#),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base", "vcpus": 300}"#,
        ),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base", "vcpus": -1}"#,
        ),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base", "memory_mib": 1e400}"#,
        ),
        (
            "/v1/environments",
            r#"{"name": "a", "image": "base", "memory_mib": 123456789012345678901234567890}"#,
        ),
        ("/v1/environments", r#"["name", "a"]"#),
        ("/v1/environments", r#"{"name": "../etc", "image": "base"}"#),
        ("/v1/environments", r#"{"name": "a", "from": "../main"}"#),
        ("/v1/environments", r#"{"name": "a", "image": "-rf"}"#),
        ("/v1/environments", r#"{"name": "a b", "image": "base"}"#),
        ("/v1/environments", &"[".repeat(1000)),
        // Semantic checks are the service's; the fake refuses "neither image nor from".
        ("/v1/environments", r#"{"name": "a"}"#),
        ("/v1/images", r#"{"name": "x", "kernel": 1}"#),
        ("/v1/images", r#"{"name": ".hidden", "build": "default"}"#),
        ("/v1/images", "{}"),
    ];
    for (path, body) in bodies {
        let reply = post_json(&unix, path, body).await;
        assert_eq!(reply.status, 400, "{path} {body}");
        assert_eq!(reply.error_code(), "bad_request");
    }
    // serde's message reaches the caller.
    let reply = post_json(&unix, "/v1/environments", r#"{"name": "a", "colour": 1}"#).await;
    assert!(
        String::from_utf8_lossy(&reply.body).contains("unknown field `colour`"),
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );

    for (method, path) in [
        ("GET", "/v1/environments/.."),
        ("GET", "/v1/environments/../etc/passwd"),
        ("GET", "/v1/environments/%2e%2e"),
        ("GET", "/v1/environments/a%2F..%2Fb"),
        ("GET", "/v1/environments/feature//x"),
        ("GET", "/v1/environments/%zz"),
        ("GET", "/v1/environments/%"),
        ("GET", "/v1/environments/%e9"),
        ("GET", "/v1/environments/a%00"),
        ("GET", "/v1/images/x.lock"),
        ("DELETE", "/v1/images/-x"),
        ("POST", "/v1/environments/..%2Fmain/pause"),
        ("GET", "/v1/environments/main?verbose=1"),
        ("GET", "/v1/images?x"),
        ("DELETE", "/v1/environments/main?force=yes"),
        ("DELETE", "/v1/environments/main?force=true&force=true"),
        ("GET", "/v1/environments/main/console?offset=-1"),
        (
            "GET",
            "/v1/environments/main/console?offset=99999999999999999999",
        ),
        ("GET", "/v1/environments/main/console?limit=0"),
        ("GET", "/v1/environments/main/console?follow=maybe"),
        ("GET", "/healthz?x=1"),
    ] {
        let reply = request(&unix, method, path, &[], None).await;
        assert_eq!(reply.status, 400, "{method} {path}");
        assert_eq!(reply.error_code(), "bad_request");
    }

    // Routes without a body refuse one; routes with one need it.
    let reply = post_json(&unix, "/v1/environments/main/pause", "{}").await;
    assert_eq!(reply.status, 400);
    let reply = request(&unix, "POST", "/v1/environments", &[], None).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let server = Server::start().await;
    let unix = server.unix();
    for path in [
        "/",
        "/v1",
        "/v2/images",
        "/v1/images/",
        "/v1/environment",
        "/healthz/",
    ] {
        let reply = request(&unix, "GET", path, &[], None).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.error_code(), "not_found");
    }
    for (method, path, allow) in [
        ("PUT", "/v1/images", "GET, POST"),
        ("POST", "/v1/images/base", "GET, DELETE"),
        ("GET", "/v1/environments/main/pause", "POST"),
        ("DELETE", "/v1/environments/main/console", "GET, POST"),
        ("PATCH", "/v1/environments/main", "GET, DELETE"),
        ("POST", "/healthz", "GET"),
        ("HEAD", "/metrics", "GET"),
    ] {
        let reply = request(&unix, method, path, &[], None).await;
        assert_eq!(reply.status, 405, "{method} {path}");
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(reply.error_code(), "method_not_allowed");
        }
    }
    let reply = request(&unix, "GET", "/v1/images/missing", &[], None).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn conflicts_and_service_failures_pass_through() {
    let server = Server::start().await;
    let unix = server.unix();
    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "main", "image": "base"}"#,
    )
    .await;
    assert_eq!(reply.status, 409);
    assert_eq!(reply.error_code(), "conflict");
    let reply = request(&unix, "DELETE", "/v1/images/base", &[], None).await;
    assert_eq!(reply.status, 409);

    let reply = post_json(
        &unix,
        "/v1/environments",
        r#"{"name": "explode", "image": "base"}"#,
    )
    .await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.error_code(), "internal");
    let reply = post_json(
        &unix,
        "/v1/images",
        r#"{"name": "explode", "build": "default"}"#,
    )
    .await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn bodies_past_the_limit_are_413() {
    let server = Server::start().await;
    let unix = server.unix();
    let big = format!(r#"{{"name": "a", "image": "{}"}}"#, "x".repeat(70 * 1024));
    let reply = post_json(&unix, "/v1/environments", &big).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error_code(), "payload_too_large");

    // Announced too large: refused before reading.
    let head = "POST /v1/environments HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 10000000\r\n\r\n{";
    assert_eq!(
        raw(&server.socket, head.as_bytes(), false, SHORT).await,
        Ok(Some(413))
    );

    // Chunked, with no length announced: refused once the count passes the limit.
    let mut chunked = b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("1000\r\n{}\r\n", " ".repeat(0x1000)).as_bytes());
    }
    assert_eq!(
        raw(&server.socket, &chunked, false, SHORT).await,
        Ok(Some(413))
    );

    // Exactly at the limit is fine (and then a 400 for the JSON, from serde).
    let at_limit = format!(
        r#"{{"name": "a", "image": "{}"}}"#,
        "x".repeat(64 * 1024 - 26)
    );
    assert_eq!(at_limit.len(), 64 * 1024);
    let reply = post_json(&unix, "/v1/environments", &at_limit).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn non_json_bodies_are_415() {
    let server = Server::start().await;
    let unix = server.unix();
    let body = br#"{"name": "a", "image": "base"}"#;
    for headers in [
        vec![],
        vec![("content-type", "text/plain")],
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![("content-type", "application/jsonp")],
    ] {
        let reply = request(&unix, "POST", "/v1/environments", &headers, Some(body)).await;
        assert_eq!(reply.status, 415, "{headers:?}");
        assert_eq!(reply.error_code(), "unsupported_media_type");
    }
    let reply = request(
        &unix,
        "POST",
        "/v1/environments",
        &[("content-type", "application/json; charset=utf-8")],
        Some(body),
    )
    .await;
    assert_eq!(reply.status, 201);
}

#[tokio::test]
async fn oversized_and_garbled_heads_are_refused_by_hyper() {
    let server = Server::start().await;
    let long = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    assert_eq!(
        raw(&server.socket, long.as_bytes(), false, SHORT).await,
        Ok(Some(431))
    );
    let garbage = b"\x00\x01\x02 nonsense\r\n\r\n";
    assert_eq!(
        raw(&server.socket, garbage, false, SHORT).await,
        Ok(Some(400))
    );
    // The server still answers.
    let reply = request(&server.unix(), "GET", "/healthz", &[], None).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_silent_client_is_cut_off_after_the_header_timeout() {
    let mut options = http_support::quick_options();
    options.header_read_timeout = Duration::from_millis(200);
    let server = Server::start_with(options).await;
    let mut stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost:")
        .await
        .expect("write half a head");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(SHORT, stream.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the server kept a silent client");
}

#[tokio::test]
async fn keep_alive_connections_serve_several_requests() {
    let server = Server::start().await;
    let mut stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .expect("connect");
    let two = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    stream.write_all(two.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(SHORT, stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("HTTP/1.1 404 Not Found\r\n"), "{answer}");
}

#[tokio::test]
async fn shutdown_ends_streams_and_returns() {
    let mut server = Server::start().await;
    let response = send(&server.unix(), "GET", "/v1/events", &[], None).await;
    let events = response.into_body();
    let response = send(
        &server.unix(),
        "GET",
        "/v1/environments/main/console?follow=true",
        &[],
        None,
    )
    .await;
    let console = response.into_body();
    let started = std::time::Instant::now();
    server.stop().await.expect("serve returns Ok");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for body in [events, console] {
        let end = tokio::time::timeout(SHORT, body.collect()).await;
        assert!(end.is_ok(), "a stream outlived the server");
    }
    assert!(tokio::net::UnixStream::connect(&server.socket)
        .await
        .is_err());
}

#[tokio::test]
async fn invalid_options_are_refused() {
    let dir = http_support::TempDir::new("opts");
    let listener = grove_api::http::bind_unix(dir.path().join("s")).expect("bind");
    let options = grove_api::http::ServeOptions {
        keep_alive_interval: Duration::ZERO,
        ..Default::default()
    };
    let result = grove_api::http::serve_with(
        http_support::FakeService::new(),
        grove_api::http::Listeners::unix(listener),
        options,
        std::future::pending(),
    )
    .await;
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::InvalidInput)
    );
}
