//! 10,000 malformed requests over the Unix socket, to the HTTP layer over a fake service and
//! to the real daemon: random bytes, broken heads, truncated and
//! oversized bodies, JSON of the wrong shape, path tricks, bad percent-encoding, bad query
//! parameters. The server must never crash or hang, must answer every request that gets an
//! answer with a 4xx, and must still serve a valid request afterwards.
//!
//! The generator is seeded; the seed is printed, and `GROVE_FUZZ_SEED=<n>` replays a run.

mod http_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_support::{post_json, raw, request, Server};

const REQUESTS: usize = 10_000;
const WORKERS: usize = 32;

/// splitmix64: small, seedable, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Up to `max` lowercase letters (at least `min`).
    fn word(&mut self, min: usize, max: usize) -> String {
        let len = min + self.below(max + 1 - min);
        (0..len)
            .map(|_| char::from(b'a' + self.below(26) as u8))
            .collect()
    }
}

/// One malformed request.
struct Case {
    kind: &'static str,
    bytes: Vec<u8>,
    /// Close the writing half after sending (the request is deliberately incomplete).
    half_close: bool,
    /// A complete request: the server must answer it.
    expect_answer: bool,
}

fn head(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: grove\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn json_request(path: &str, body: &[u8]) -> Vec<u8> {
    head(
        "POST",
        path,
        &[
            ("content-type", "application/json".into()),
            ("content-length", body.len().to_string()),
        ],
        body,
    )
}

/// A JSON body that is not a valid `CreateEnvironment` or `CreateImage` for the HTTP layer.
fn bad_json(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    let wrong_values = [
        "5",
        "true",
        "[]",
        "{}",
        "\"1\"",
        "1.5",
        "-1",
        "1e999",
        "256",
        "-0.0",
        "99999999999999999999999999",
        "\"\\ud800\"",
        "null",
    ];
    let bad_names = [
        "\"../etc\"",
        "\"..\"",
        "\"a/../b\"",
        "\"/abs\"",
        "\"a/\"",
        "\"a//b\"",
        "\".x\"",
        "\"-rf\"",
        "\"a b\"",
        "\"a\\u0000b\"",
        "\"x.lock\"",
        "\"é\"",
        "\"$(id)\"",
        "\"\"",
        "\"a%2Fb\"",
    ];
    let env = rng.below(2) == 0;
    let path = if env {
        "/v1/environments"
    } else {
        "/v1/images"
    };
    let base = if env {
        r#"{"name": "fz", "image": "base"}"#
    } else {
        r#"{"name": "fz", "build": "default"}"#
    };
    let body = match rng.below(9) {
        0 => {
            // A field of the wrong type.
            let field = if env {
                *rng.pick(&["name", "image", "from", "vcpus", "memory_mib"])
            } else {
                *rng.pick(&["name", "kernel", "rootfs", "initrd", "build"])
            };
            // `null` is a valid `Option`, `"1"` a valid name: skip those pairs. Other
            // strings in string fields are left to the service (400 or 404 from the fake).
            let value = loop {
                let v = *rng.pick(&wrong_values);
                let fine = (v == "null" && field != "name") || (v == "\"1\"" && field == "name");
                if !fine {
                    break v;
                }
            };
            if field == "name" {
                let other = if env {
                    "\"image\": \"base\""
                } else {
                    "\"build\": \"default\""
                };
                format!("{{\"name\": {value}, {other}}}")
            } else {
                format!("{{\"name\": \"fz\", \"{field}\": {value}}}")
            }
        }
        1 => format!(
            "{{\"name\": \"fz\", \"{}\": {}}}",
            rng.word(1, 10),
            rng.pick(&wrong_values)
        ),
        2 => format!(
            "{{\"name\": {}, \"image\": \"base\"}}",
            rng.pick(&bad_names)
        ),
        3 if env => format!(
            "{{\"name\": \"fz\", \"{}\": {}}}",
            rng.pick(&["image", "from"]),
            rng.pick(&bad_names)
        ),
        3 => format!(
            "{{\"name\": {}, \"build\": \"default\"}}",
            rng.pick(&bad_names)
        ),
        4 => {
            // Truncated JSON text (the request itself is complete).
            let cut = rng.below(base.len() - 1);
            base[..cut].to_string()
        }
        5 => format!("{base}{}", rng.pick(&[" x", "}", ",", "{}", "\u{0}"])),
        6 => {
            let depth = 1 + rng.below(5000);
            "[".repeat(depth) + &"]".repeat(rng.below(depth))
        }
        7 => format!(
            "{{\"name\": \"fz\", \"name\": \"fy\", {}}}",
            &base[15..base.len() - 1]
        ),
        _ => {
            let mut b = base.as_bytes().to_vec();
            let at = 10 + rng.below(4);
            b.insert(at, 0xff);
            return (path, b);
        }
    };
    (path, body.into_bytes())
}

/// A `{name}` for a path that is not a valid name once decoded, or is not decodable.
fn bad_path_name(rng: &mut Rng) -> String {
    let tricks = [
        "../x",
        "..",
        "%2e%2e",
        "%2E%2E%2Fetc",
        "a/../b",
        "a%2F..%2Fb",
        "%zz",
        "%",
        "%4",
        "%e9",
        "%c3%28",
        "%00",
        "%20",
        "%3B",
        "%0a",
        "a//b",
        "/.x",
        "/-x",
        ".x",
        "-x",
        "x.lock",
        "x.",
        "%2Fabs",
        "a%2F",
        "%2e",
    ];
    let valid = ["main", "feature", "a", "release/1.2", "x_y"];
    match rng.below(4) {
        0 => rng.pick(&tricks).to_string(),
        1 => format!("{}{}", rng.pick(&valid), rng.pick(&tricks)),
        2 => format!("{}/{}", rng.pick(&valid), rng.pick(&tricks)),
        _ => "a".repeat(101 + rng.below(200)),
    }
}

fn case(rng: &mut Rng) -> Case {
    let answer = |kind, bytes| Case {
        kind,
        bytes,
        half_close: false,
        expect_answer: true,
    };
    match rng.below(16) {
        0 => {
            let len = rng.below(600);
            Case {
                kind: "random bytes",
                bytes: rng.bytes(len),
                half_close: true,
                expect_answer: false,
            }
        }
        1 => {
            // Printable noise with line breaks: the head is never valid.
            let mut text: Vec<u8> = (0..rng.below(400))
                .map(|_| *rng.pick(b"GET /v1 HTTP/1.1\r\n:aZ%?=&{}\" \t"))
                .collect();
            text.insert(0, b'{');
            Case {
                kind: "noise",
                bytes: text,
                half_close: true,
                expect_answer: false,
            }
        }
        2 => {
            // A header line without a colon.
            let line = format!("{} {}", rng.word(1, 8), rng.word(0, 7));
            let bytes = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{line}\r\n\r\n");
            answer("bad header", bytes.into_bytes())
        }
        3 => {
            // A body shorter than announced.
            let body = br#"{"name": "fz", "image": "base"}"#;
            let cut = rng.below(body.len());
            let mut bytes = head(
                "POST",
                "/v1/environments",
                &[
                    ("content-type", "application/json".into()),
                    (
                        "content-length",
                        (body.len() + 1 + rng.below(100)).to_string(),
                    ),
                ],
                &[],
            );
            bytes.extend_from_slice(&body[..cut]);
            Case {
                kind: "truncated body",
                bytes,
                half_close: true,
                expect_answer: false,
            }
        }
        4..=6 => {
            let (path, body) = bad_json(rng);
            answer("bad JSON", json_request(path, &body))
        }
        7 => {
            let name = bad_path_name(rng);
            let (method, path) = *rng.pick(&[
                ("GET", "/v1/environments/{}"),
                ("DELETE", "/v1/environments/{}"),
                ("POST", "/v1/environments/{}/pause"),
                ("POST", "/v1/environments/{}/sync"),
                ("GET", "/v1/environments/{}/console"),
                ("GET", "/v1/images/{}"),
                ("DELETE", "/v1/images/{}"),
            ]);
            let path = path.replace("{}", &name);
            answer("bad name", head(method, &path, &[], &[]))
        }
        8 => {
            let (method, path) = *rng.pick(&[
                ("DELETE", "/v1/environments/main?force=maybe"),
                ("DELETE", "/v1/environments/main?force"),
                ("DELETE", "/v1/environments/main?force=true&force=false"),
                ("GET", "/v1/environments/main/console?offset=-1"),
                (
                    "GET",
                    "/v1/environments/main/console?offset=184467440737095516160",
                ),
                ("GET", "/v1/environments/main/console?limit=0"),
                ("GET", "/v1/environments/main/console?limit=99999999"),
                ("GET", "/v1/environments/main/console?%zz=1"),
                ("GET", "/v1/environments/main/console?follow=%"),
                ("GET", "/v1/environments?page=2"),
                ("GET", "/healthz?x"),
                ("POST", "/v1/environments/main/pause?now=1"),
            ]);
            answer("bad query", head(method, path, &[], &[]))
        }
        9 => {
            // Heads past the limit: one huge header, or very many.
            let bytes = if rng.below(2) == 0 {
                let value = "v".repeat(17 * 1024 + rng.below(50 * 1024));
                head("GET", "/healthz", &[("x-big", value)], &[])
            } else {
                let headers: Vec<(&str, String)> = (0..150 + rng.below(100))
                    .map(|_| ("x-h", "1".into()))
                    .collect();
                head("GET", "/healthz", &headers, &[])
            };
            answer("big head", bytes)
        }
        10 => {
            // Bodies past the limit: announced, or chunked without a length.
            let bytes = if rng.below(2) == 0 {
                let announced = 64 * 1024 + 1 + rng.below(1 << 30);
                let sent = rng.below(70 * 1024);
                head(
                    "POST",
                    "/v1/environments",
                    &[
                        ("content-type", "application/json".into()),
                        ("content-length", announced.to_string()),
                    ],
                    &vec![b' '; sent],
                )
            } else {
                let mut bytes = head(
                    "POST",
                    "/v1/images",
                    &[
                        ("content-type", "application/json".into()),
                        ("transfer-encoding", "chunked".into()),
                    ],
                    &[],
                );
                for _ in 0..17 {
                    bytes.extend_from_slice(
                        format!("1000\r\n{}\r\n", " ".repeat(0x1000)).as_bytes(),
                    );
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes
            };
            answer("big body", bytes)
        }
        11 => {
            let body = br#"{"name": "fz", "image": "base"}"#;
            let ct = rng.pick(&[
                "text/plain",
                "application/xml",
                "json",
                "application/json2",
                "",
            ]);
            let mut headers = vec![("content-length", body.len().to_string())];
            if !ct.is_empty() {
                headers.push(("content-type", ct.to_string()));
            }
            answer(
                "bad content type",
                head("POST", "/v1/environments", &headers, body),
            )
        }
        12 => {
            let (method, path) = *rng.pick(&[
                ("GET", "/"),
                ("GET", "/v1"),
                ("GET", "/v1/images/"),
                ("GET", "/v3/environments"),
                ("PUT", "/v1/images"),
                ("PATCH", "/v1/environments/main"),
                ("GET", "/v1/environments/main/pause"),
                ("OPTIONS", "/healthz"),
                ("TRACE", "/v1/events"),
                ("GET", "/v1/environments/main/snapshot"),
            ]);
            answer("bad route", head(method, path, &[], &[]))
        }
        13 => {
            let framings: [&[u8]; 12] = [
                &b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"[..],
                &b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}"[..],
                &b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-length: -2\r\n\r\n{}"[..],
                &b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999999\r\n\r\n{}"[..],
                &b"POST /v1/images HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n{}"[..],
                &b"GET /healthz HTTP/2.0\r\nhost: x\r\n\r\n"[..],
                &b"GET /healthz HTTP/1.7\r\nhost: x\r\n\r\n"[..],
                &b"G@T /healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..],
                &b"GET healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..],
                &b"GET /health z HTTP/1.1\r\nhost: x\r\n\r\n"[..],
                &b"GET /\xff HTTP/1.1\r\nhost: x\r\n\r\n"[..],
                &b"GET /healthz HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n"[..],
            ];
            let bytes = *rng.pick(&framings);
            let expect = !bytes.starts_with(b"POST /v1/images HTTP/1.1\r\nhost: x\r\ncontent-type");
            Case {
                kind: "bad framing",
                bytes: bytes.to_vec(),
                half_close: false,
                expect_answer: expect,
            }
        }
        14 => {
            // A valid request cut short inside its head.
            let full = json_request("/v1/environments", br#"{"name": "fz", "image": "base"}"#);
            let head_len = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
            let cut = rng.below(head_len.max(1));
            Case {
                kind: "truncated head",
                bytes: full[..cut].to_vec(),
                half_close: true,
                expect_answer: false,
            }
        }
        _ => {
            // A valid head with random bytes as a JSON body.
            let len = 1 + rng.below(300);
            let mut body = rng.bytes(len);
            body.insert(0, b'{');
            answer("random JSON body", json_request("/v1/environments", &body))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_malformed_requests() {
    let seed = std::env::var("GROVE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("http_fuzz seed: {seed} (replay with GROVE_FUZZ_SEED={seed})");

    let mut options = http_support::quick_options();
    options.header_read_timeout = Duration::from_secs(1);
    let server = Server::start_with(options).await;
    fuzz(&server.socket, seed, REQUESTS).await;

    // Still alive and still serving.
    assert!(server.task.as_ref().is_some_and(|t| !t.is_finished()));
    let reply = request(&server.unix(), "GET", "/healthz", &[], None).await;
    assert_eq!(reply.status, 200);
    let reply = post_json(
        &server.unix(),
        "/v1/environments",
        r#"{"name": "after-fuzz", "from": "main"}"#,
    )
    .await;
    assert_eq!(
        reply.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    let reply = request(
        &server.unix(),
        "GET",
        "/v1/environments/after-fuzz",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// Sends `requests` malformed requests (generated from `seed`) to the server at `socket`, 32
/// at a time, and fails on any answer that is not a 4xx, on a hang, or on a complete request
/// left unanswered.
async fn fuzz(socket: &std::path::Path, seed: u64, requests: usize) {
    let mut rng = Rng(seed);
    let cases: Arc<Vec<Case>> = Arc::new((0..requests).map(|_| case(&mut rng)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let cases = Arc::clone(&cases);
        let next = Arc::clone(&next);
        let socket = socket.to_path_buf();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut statuses = BTreeMap::<u16, usize>::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let outcome = raw(
                    &socket,
                    &case.bytes,
                    case.half_close,
                    Duration::from_secs(5),
                )
                .await;
                let problem = match outcome {
                    Ok(Some(status)) if (400..500).contains(&status) => {
                        *statuses.entry(status).or_default() += 1;
                        None
                    }
                    Ok(Some(status)) => Some(format!("answered {status}")),
                    Ok(None) if case.expect_answer => Some("no answer".to_string()),
                    Ok(None) => None,
                    Err(e) => Some(e),
                };
                if let Some(problem) = problem {
                    let shown = String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(300)])
                        .into_owned();
                    failures.push(format!("#{i} {}: {problem}: {shown:?}", case.kind));
                }
            }
            (statuses, failures)
        }));
    }
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut failures = Vec::new();
    for worker in workers {
        let (s, f) = worker.await.expect("a worker panicked");
        for (status, n) in s {
            *statuses.entry(status).or_default() += n;
        }
        failures.extend(f);
    }
    let answered: usize = statuses.values().sum();
    println!(
        "{requests} malformed requests in {:?}: {answered} answered with a 4xx {statuses:?}, \
         {} failures",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failures, the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(
        answered > requests / 2,
        "seed {seed}: only {answered} answers"
    );
}

/// The same against the real daemon (its orchestrator, store and supervisor behind the HTTP
/// layer), on an empty data directory: it must survive and serve afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_daemon_survives_malformed_requests() {
    let tmp = std::env::temp_dir().join(format!("grove-fuzz-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let socket = tmp.join("groved.sock");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_groved"))
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .arg("--socket")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start groved");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "groved did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("daemon fuzz seed: {seed}");
    fuzz(&socket, seed, REQUESTS).await;
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "groved died under malformed requests"
    );
    let target = http_support::Target::Unix(socket.clone());
    let reply = request(&target, "GET", "/healthz", &[], None).await;
    assert_eq!(reply.status, 200);
    let reply = request(&target, "GET", "/v1/environments", &[], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], &b"[]"[..]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}
