//! `api/openapi.yaml` against the code: the same (method, path) set as
//! `grove_api::http::ROUTES`, every `$ref` resolves, every operation documents its error
//! answers, and each schema has exactly the fields the model types serialize.
//!
//! The spec is read with a small line-based parser that understands the subset of YAML the
//! file uses (block mappings by indentation, `[a, b]` flow lists); no YAML crate needed.

use std::collections::BTreeSet;

use grove_api::error::{ApiError, ErrorBody};
use grove_api::http::ROUTES;
use grove_api::model::{
    BranchTimings, CreateEnvironment, CreateImage, EnvState, Environment, EnvironmentCreated,
    Event, ExecRequest, ExecResult, HookResult, Image, PublishedPort, Readiness, Snapshot,
};
use serde::Serialize;

/// A non-blank, non-comment line: its indentation and its trimmed text.
#[derive(Debug)]
struct Line {
    indent: usize,
    text: String,
}

fn spec() -> Vec<Line> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read api/openapi.yaml");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| Line {
            indent: l.len() - l.trim_start().len(),
            text: l.trim().to_string(),
        })
        .collect()
}

/// The key of a `key:` or `key: value` line.
fn key(line: &Line) -> Option<&str> {
    let text = line.text.as_str();
    if let Some(k) = text.strip_suffix(':') {
        return Some(k.trim_matches('\''));
    }
    text.split_once(": ").map(|(k, _)| k.trim_matches('\''))
}

/// The entries of the mapping at `indent` in `lines`: each key with the lines under it.
fn children(lines: &[Line], indent: usize) -> Vec<(String, &[Line])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].indent == indent {
            if let Some(k) = key(&lines[i]) {
                let end = lines[i + 1..]
                    .iter()
                    .position(|l| l.indent <= indent)
                    .map_or(lines.len(), |p| i + 1 + p);
                out.push((k.to_string(), &lines[i + 1..end]));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out
}

fn child<'a>(lines: &'a [Line], indent: usize, name: &str) -> &'a [Line] {
    children(lines, indent)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, block)| block)
        .unwrap_or_else(|| panic!("no {name:?} at indent {indent}"))
}

/// The values of a `key: [a, b, c]` line at `indent`.
fn flow_list(lines: &[Line], indent: usize, name: &str) -> Option<BTreeSet<String>> {
    let prefix = format!("{name}: [");
    lines
        .iter()
        .find(|l| l.indent == indent && l.text.starts_with(&prefix))
        .map(|l| {
            l.text[prefix.len()..]
                .trim_end_matches(']')
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
}

const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

/// `(METHOD, path, operation lines)` of every operation in `paths`.
fn operations(spec: &[Line]) -> Vec<(String, String, &[Line])> {
    let mut out = Vec::new();
    for (path, block) in children(child(spec, 0, "paths"), 2) {
        for (method, op) in children(block, 4) {
            if METHODS.contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone(), op));
            }
        }
    }
    out
}

#[test]
fn routes_and_spec_have_the_same_operations() {
    let spec = spec();
    let in_spec: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let in_code: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(ROUTES.len(), in_code.len(), "ROUTES has a duplicate row");
    let missing: Vec<_> = in_code.difference(&in_spec).collect();
    let extra: Vec<_> = in_spec.difference(&in_code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes not in openapi.yaml: {missing:?}; in openapi.yaml but not routed: {extra:?}"
    );
}

#[test]
fn every_reference_resolves() {
    let spec = spec();
    let components = child(&spec, 0, "components");
    let mut refs = 0;
    for line in &spec {
        let Some((_, target)) = line.text.split_once("$ref: ") else {
            continue;
        };
        let target = target.trim_matches('\'').trim_matches('"');
        let parts: Vec<&str> = target.split('/').collect();
        let ["#", "components", kind, name] = parts[..] else {
            panic!("unexpected reference {target:?}");
        };
        let defined = children(child(components, 2, kind), 4);
        assert!(
            defined.iter().any(|(k, _)| k == name),
            "{target} is referenced but not defined"
        );
        refs += 1;
    }
    assert!(
        refs > 30,
        "only {refs} references found: is the parser broken?"
    );
}

#[test]
fn every_operation_documents_its_errors_and_parameters() {
    let spec = spec();
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&spec) {
        let what = format!("{method} {path}");
        let id = op
            .iter()
            .find(|l| l.indent == 6 && l.text.starts_with("operationId: "))
            .unwrap_or_else(|| panic!("{what}: no operationId"));
        assert!(
            ids.insert(id.text.clone()),
            "{what}: operationId used twice"
        );

        let statuses: BTreeSet<String> = children(child(op, 6, "responses"), 8)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut needed = vec!["400", "401"];
        if children(op, 6).iter().any(|(k, _)| k == "requestBody") {
            needed.extend(["408", "413", "415"]);
        }
        if path.contains("{name}") {
            needed.push("404");
        }
        for status in needed {
            assert!(statuses.contains(status), "{what}: no {status} answer");
        }
        assert!(
            statuses.iter().any(|s| s.starts_with('2')),
            "{what}: no success answer"
        );
    }
    // Every templated path declares its name parameter.
    for (path, block) in children(child(&spec, 0, "paths"), 2) {
        if path.contains("{name}") {
            let params = child(block, 4, "parameters");
            assert!(
                params
                    .iter()
                    .any(|l| l.text.contains("#/components/parameters/Name")),
                "{path}: no Name parameter"
            );
        }
    }
}

/// The property names and the `required` list of a schema.
fn schema(spec: &[Line], name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let schemas = child(child(spec, 0, "components"), 2, "schemas");
    let block = child(schemas, 4, name);
    let properties = children(child(block, 6, "properties"), 8)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let required = flow_list(block, 6, "required").unwrap_or_default();
    (properties, required)
}

fn keys<T: Serialize>(value: &T) -> BTreeSet<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        other => panic!("not an object: {other:?}"),
    }
}

fn environment() -> Environment {
    Environment {
        name: "e".into(),
        parent: Some("p".into()),
        image: "i".into(),
        state: EnvState::Running,
        vcpus: 1,
        memory_mib: 128,
        created: 1,
        snapshot: Some("p@1".into()),
        exit_reason: Some("x".into()),
        pid: Some(1),
        address: Some("10.213.0.2".into()),
        allow_outbound: Some(false),
        ports: vec![port()],
    }
}

fn port() -> PublishedPort {
    PublishedPort {
        guest_port: 8080,
        host_addr: "127.0.0.1:41234".into(),
    }
}

fn readiness() -> Readiness {
    Readiness {
        ready_ms: 1.0,
        guest_ms: Some(0.75),
        added_ms: Some(0.25),
        guest_wait_ms: Some(0.9),
        host_ms: Some(0.1),
        guest_transport_ms: Some(0.15),
        hostname: "h".into(),
        reseeded: true,
        hooks: vec![HookResult {
            name: "10-x".into(),
            exit_code: Some(0),
            output: String::new(),
        }],
    }
}

fn timings() -> BranchTimings {
    BranchTimings {
        parent_pause_ms: 1.0,
        snapshot_mode: grove_api::model::SnapshotMode::Live,
        snapshot_ms: 2.0,
        restore_ms: 3.0,
        total_ms: 4.0,
    }
}

#[test]
fn schemas_match_the_model_types() {
    let spec = spec();
    // Answers serialize every field (options as null), so all are required.
    let answers: Vec<(&str, BTreeSet<String>)> = vec![
        (
            "Image",
            keys(&Image {
                name: "i".into(),
                kernel: "/k".into(),
                rootfs: "/r".into(),
                initrd: Some("/i".into()),
                created: 1,
            }),
        ),
        ("Environment", keys(&environment())),
        ("PublishedPort", keys(&port())),
        ("BranchTimings", keys(&timings())),
        (
            "EnvironmentCreated",
            keys(&EnvironmentCreated {
                environment: environment(),
                branch: Some(timings()),
                ready: Some(readiness()),
            }),
        ),
        ("Readiness", keys(&readiness())),
        ("HookResult", keys(&readiness().hooks[0])),
        (
            "ExecResult",
            keys(&ExecResult {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                truncated: false,
                stdout: String::new(),
                stderr: String::new(),
            }),
        ),
        (
            "Snapshot",
            keys(&Snapshot {
                id: "e@1".into(),
                environment: "e".into(),
                parent: Some("p@1".into()),
                created: 1,
                pause_ms: 1.0,
            }),
        ),
        (
            "Event",
            keys(&Event {
                kind: "environment".into(),
                name: "e".into(),
                action: "state".into(),
                state: Some(EnvState::Paused),
                time: 1,
            }),
        ),
        ("ErrorBody", keys(&ApiError::conflict("x").body())),
        ("ErrorDetail", keys(&ApiError::conflict("x").body().error)),
        ("Health", keys(&serde_json::json!({"status": "ok"}))),
    ];
    for (name, fields) in answers {
        let (properties, required) = schema(&spec, name);
        assert_eq!(properties, fields, "{name}: properties");
        assert_eq!(required, fields, "{name}: required");
    }

    // Requests: every field documented, only `name` required.
    let requests: Vec<(&str, BTreeSet<String>)> = vec![
        (
            "CreateImage",
            keys(&CreateImage {
                name: "i".into(),
                kernel: Some("/k".into()),
                rootfs: Some("/r".into()),
                initrd: Some("/i".into()),
                build: Some("default".into()),
            }),
        ),
        (
            "CreateEnvironment",
            keys(&CreateEnvironment {
                name: "e".into(),
                image: Some("i".into()),
                from: Some("p".into()),
                vcpus: Some(1),
                memory_mib: Some(1),
                agent: Some(true),
                publish: vec![80],
                allow_outbound: Some(true),
                snapshot_mode: None,
            }),
        ),
    ];
    for (name, fields) in requests {
        let (properties, required) = schema(&spec, name);
        assert_eq!(properties, fields, "{name}: properties");
        assert_eq!(required, BTreeSet::from(["name".to_string()]), "{name}");
    }
    // ExecRequest: every field documented, only `argv` required.
    let exec = keys(&ExecRequest {
        argv: vec!["true".into()],
        env: [("K".to_string(), "V".to_string())].into(),
        cwd: Some("/".into()),
        stdin: Some(String::new()),
        timeout_ms: Some(1),
    });
    let (properties, required) = schema(&spec, "ExecRequest");
    assert_eq!(properties, exec, "ExecRequest");
    assert_eq!(required, BTreeSet::from(["argv".to_string()]));
    assert!(serde_json::from_str::<ExecRequest>(r#"{"argv": ["x"]}"#).is_ok());
    assert!(serde_json::from_str::<ExecRequest>(r#"{"argv": ["x"], "y": 1}"#).is_err());
    assert!(serde_json::from_str::<CreateImage>(r#"{"name": "x"}"#).is_ok());
    assert!(serde_json::from_str::<CreateImage>("{}").is_err());
    assert!(serde_json::from_str::<CreateEnvironment>(r#"{"name": "x"}"#).is_ok());
    assert!(serde_json::from_str::<CreateEnvironment>("{}").is_err());
    let _: ErrorBody = ApiError::conflict("x").body();

    // The states, checked exhaustively: a new variant fails to compile here.
    let states = [
        EnvState::Starting,
        EnvState::Running,
        EnvState::Paused,
        EnvState::Stopped,
        EnvState::Failed,
    ];
    for state in states {
        match state {
            EnvState::Starting
            | EnvState::Running
            | EnvState::Paused
            | EnvState::Stopped
            | EnvState::Failed => {}
        }
    }
    let names: BTreeSet<String> = states
        .iter()
        .map(|s| match serde_json::to_value(s) {
            Ok(serde_json::Value::String(s)) => s,
            other => panic!("{other:?}"),
        })
        .collect();
    let schemas = child(child(&spec, 0, "components"), 2, "schemas");
    let in_spec = flow_list(child(schemas, 4, "EnvState"), 6, "enum");
    assert_eq!(in_spec, Some(names), "EnvState values");
}
