//! The routing table, and what turns a request line into a typed [`Op`]: path templates,
//! percent-decoded names and validated query parameters. No I/O and no service calls here,
//! so every rule is unit-tested on strings.

use crate::error::ApiError;
use crate::model::SnapshotMode;
use crate::names;

/// What a routed request asks for. One variant per row of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Healthz,
    Metrics,
    Events,
    ListImages,
    CreateImage,
    GetImage,
    DeleteImage,
    ListEnvironments,
    CreateEnvironment,
    GetEnvironment,
    DeleteEnvironment,
    Pause,
    Resume,
    Snapshot,
    Sync,
    Console,
    ConsoleInput,
    Exec,
    GetFile,
    PutFile,
}

/// Builds [`ROUTES`] and the matching [`OPS`] from one list, so the two cannot drift apart.
macro_rules! routes {
    ($($method:literal $path:literal => $op:ident,)*) => {
        /// Every route the API serves, as `(method, OpenAPI path template)`. The router is
        /// built from this table (a request's path is matched against the templates, then its
        /// method against the rows of the template that matched), and a test checks it equals
        /// the `paths` of `api/openapi.yaml`. `{name}` stands for an image or environment name,
        /// which may contain `/`.
        pub const ROUTES: &[(&str, &str)] = &[$(($method, $path),)*];
        /// `OPS[i]` is what `ROUTES[i]` does.
        const OPS: &[Op] = &[$(Op::$op,)*];
    };
}

routes! {
    "GET" "/healthz" => Healthz,
    "GET" "/metrics" => Metrics,
    "GET" "/v1/events" => Events,
    "GET" "/v1/images" => ListImages,
    "POST" "/v1/images" => CreateImage,
    "GET" "/v1/images/{name}" => GetImage,
    "DELETE" "/v1/images/{name}" => DeleteImage,
    "GET" "/v1/environments" => ListEnvironments,
    "POST" "/v1/environments" => CreateEnvironment,
    "GET" "/v1/environments/{name}" => GetEnvironment,
    "DELETE" "/v1/environments/{name}" => DeleteEnvironment,
    "POST" "/v1/environments/{name}/pause" => Pause,
    "POST" "/v1/environments/{name}/resume" => Resume,
    "POST" "/v1/environments/{name}/snapshot" => Snapshot,
    "POST" "/v1/environments/{name}/sync" => Sync,
    "GET" "/v1/environments/{name}/console" => Console,
    "POST" "/v1/environments/{name}/console" => ConsoleInput,
    "POST" "/v1/environments/{name}/exec" => Exec,
    "GET" "/v1/environments/{name}/files" => GetFile,
    "PUT" "/v1/environments/{name}/files" => PutFile,
}

/// The outcome of routing a request line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed<'p> {
    /// `raw_name` is the `{name}` part of the path, still percent-encoded.
    Found {
        op: Op,
        raw_name: Option<&'p str>,
    },
    /// The path is a route, the method is not one of `allow`.
    WrongMethod {
        allow: Vec<&'static str>,
    },
    NotFound,
}

/// Routes `method` and the raw (percent-encoded) `path`.
///
/// The path alone picks the template: a template without `{name}` must equal the path; one
/// with `{name}` must start with the text before it and end with the text after it, with a
/// non-empty rest in between. Templates are matched on the raw path, so a literal suffix such
/// as `/pause` is only ever a suffix; when several templates match, the one with the longest
/// literal suffix wins (`/v1/environments/a/pause` is the pause of `a`). A name whose last
/// part collides with a suffix is reached by encoding its last `/` as `%2F`
/// (`/v1/environments/a%2Fpause` is the environment `a/pause`).
pub(crate) fn route<'p>(method: &str, path: &'p str) -> Routed<'p> {
    let mut best: Option<(usize, &'static str, Option<&'p str>)> = None;
    for &(_, template) in ROUTES {
        if let Some(raw_name) = match_template(template, path) {
            let score = specificity(template);
            if best.is_none_or(|(s, _, _)| score > s) {
                best = Some((score, template, raw_name));
            }
        }
    }
    let Some((_, template, raw_name)) = best else {
        return Routed::NotFound;
    };
    let mut allow = Vec::new();
    for (&(m, t), &op) in ROUTES.iter().zip(OPS) {
        if t == template {
            if m == method {
                return Routed::Found { op, raw_name };
            }
            allow.push(m);
        }
    }
    Routed::WrongMethod { allow }
}

/// `Some(raw name)` when `path` fits `template` (`Some(None)` for a template without name).
fn match_template<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    match template.split_once("{name}") {
        None => (path == template).then_some(None),
        Some((prefix, suffix)) => {
            let rest = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
            (!rest.is_empty()).then_some(Some(rest))
        }
    }
}

/// Higher is more specific: exact templates first, then by the length of the literal suffix.
fn specificity(template: &str) -> usize {
    match template.split_once("{name}") {
        None => usize::MAX,
        Some((_, suffix)) => suffix.len(),
    }
}

/// Percent-decodes the `{name}` part of a path and checks it with [`names::validate`].
pub(crate) fn decode_name(kind: &str, raw: &str) -> Result<String, ApiError> {
    let name = percent_decode(raw)
        .map_err(|why| ApiError::bad_request(format!("invalid {kind} name in the path: {why}")))?;
    names::validate(kind, &name)?;
    Ok(name)
}

/// Decodes `%XX` escapes; anything else is kept as is. The result must be UTF-8.
fn percent_decode(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|&h| hex(h));
            let lo = bytes.get(i + 2).and_then(|&l| hex(l));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err("a % is not followed by two hex digits".into());
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "it is not UTF-8 once percent-decoded".into())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits a query string into decoded `(key, value)` pairs, refusing keys not in `allowed`,
/// repeated keys, and keys without a value.
fn parse_query(
    raw: Option<&str>,
    allowed: &[&'static str],
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut pairs: Vec<(&'static str, String)> = Vec::new();
    for piece in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
        let bad = |why: &str| ApiError::bad_request(format!("query parameter {raw_key:?}: {why}"));
        let key = percent_decode(raw_key).map_err(|why| bad(&why))?;
        let Some(&key) = allowed.iter().find(|a| **a == key) else {
            let expected = if allowed.is_empty() {
                "this route takes none".to_string()
            } else {
                format!("this route takes {}", allowed.join(", "))
            };
            return Err(bad(&format!("unknown parameter; {expected}")));
        };
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(bad("given more than once"));
        }
        let value = percent_decode(raw_value).map_err(|why| bad(&why))?;
        if value.is_empty() {
            return Err(bad("it needs a value"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Refuses any query parameter.
pub(crate) fn no_query(raw: Option<&str>) -> Result<(), ApiError> {
    parse_query(raw, &[]).map(|_| ())
}

/// `?mode=live|paused` of the requests that snapshot a running environment (a branch, a
/// snapshot, a sync); `None` when absent (live).
pub(crate) fn parse_mode(raw: Option<&str>) -> Result<Option<SnapshotMode>, ApiError> {
    let mut mode = None;
    for (_, value) in parse_query(raw, &["mode"])? {
        mode = Some(match value.as_str() {
            "live" => SnapshotMode::Live,
            "paused" => SnapshotMode::Paused,
            other => {
                return Err(ApiError::bad_request(format!(
                    "mode must be live or paused, not {other:?}"
                )))
            }
        });
    }
    Ok(mode)
}

/// `DELETE /v1/environments/{name}`'s parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeleteParams {
    pub force: bool,
}

impl DeleteParams {
    pub(crate) fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut params = Self { force: false };
        for (key, value) in parse_query(raw, &["force"])? {
            if key == "force" {
                params.force = parse_bool(key, &value)?;
            }
        }
        Ok(params)
    }
}

/// The most console bytes one answer (or one chunk of a followed console) carries.
pub const MAX_CONSOLE_CHUNK: usize = 1 << 20;

/// `GET /v1/environments/{name}/console`'s parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConsoleParams {
    /// First byte to return.
    pub offset: u64,
    /// At most this many bytes (without `follow`).
    pub limit: usize,
    /// Keep the answer open and stream new output.
    pub follow: bool,
}

impl ConsoleParams {
    pub(crate) fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut params = Self {
            offset: 0,
            limit: MAX_CONSOLE_CHUNK,
            follow: false,
        };
        for (key, value) in parse_query(raw, &["offset", "limit", "follow"])? {
            match key {
                "offset" => params.offset = parse_u64(key, &value)?,
                "limit" => {
                    params.limit = parse_u64(key, &value)?
                        .try_into()
                        .ok()
                        .filter(|l| (1..=MAX_CONSOLE_CHUNK).contains(l))
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "query parameter \"limit\": must be from 1 to {MAX_CONSOLE_CHUNK}"
                            ))
                        })?;
                }
                _ => params.follow = parse_bool(key, &value)?,
            }
        }
        Ok(params)
    }
}

/// `GET|PUT /v1/environments/{name}/files`' parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileParams {
    /// The guest path (absolute).
    pub path: String,
    /// `PUT` only: the new file's mode, given in octal (`mode=0755`).
    pub mode: Option<u32>,
}

impl FileParams {
    pub(crate) fn parse(raw: Option<&str>, put: bool) -> Result<Self, ApiError> {
        let allowed: &[&'static str] = if put { &["path", "mode"] } else { &["path"] };
        let mut path = None;
        let mut mode = None;
        for (key, value) in parse_query(raw, allowed)? {
            if key == "path" {
                path = Some(value);
            } else {
                let parsed = (value.len() <= 5
                    && value.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                .then(|| u32::from_str_radix(&value, 8).ok())
                .flatten()
                .filter(|m| *m <= 0o7777);
                mode = Some(parsed.ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "query parameter \"mode\": {value:?} is not an octal mode up to 7777"
                    ))
                })?);
            }
        }
        let path =
            path.ok_or_else(|| ApiError::bad_request("query parameter \"path\" is required"))?;
        Ok(Self { path, mode })
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "query parameter {key:?}: {value:?} is neither true nor false"
        ))),
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64, ApiError> {
    // `u64::from_str` accepts a leading `+`; a query parameter has no business with one.
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "query parameter {key:?}: {value:?} is not a whole number from 0 to {}",
                u64::MAX
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(method: &str, path: &str) -> (Op, Option<String>) {
        match route(method, path) {
            Routed::Found { op, raw_name } => (op, raw_name.map(str::to_string)),
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    #[test]
    fn every_row_routes_to_a_distinct_op() {
        assert_eq!(ROUTES.len(), OPS.len());
        for (i, op) in OPS.iter().enumerate() {
            assert!(!OPS[..i].contains(op), "{op:?} twice");
        }
        for (&(method, template), &op) in ROUTES.iter().zip(OPS) {
            let path = template.replace("{name}", "feature/x");
            let (got, name) = found(method, &path);
            assert_eq!(got, op, "{method} {template}");
            assert_eq!(name.is_some(), template.contains("{name}"));
        }
    }

    #[test]
    fn suffixes_win_and_names_keep_their_slashes() {
        assert_eq!(
            found("POST", "/v1/environments/feature/x/pause"),
            (Op::Pause, Some("feature/x".into()))
        );
        assert_eq!(
            found("GET", "/v1/environments/a/b/c"),
            (Op::GetEnvironment, Some("a/b/c".into()))
        );
        assert_eq!(
            found("GET", "/v1/environments/a%2Fconsole"),
            (Op::GetEnvironment, Some("a%2Fconsole".into()))
        );
        assert_eq!(
            found("GET", "/v1/environments/console/console"),
            (Op::Console, Some("console".into()))
        );
        assert_eq!(
            found("GET", "/v1/environments/pause"),
            (Op::GetEnvironment, Some("pause".into()))
        );
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        for path in [
            "/",
            "/v1",
            "/v1/",
            "/v1/images/",
            "/v1/environments/",
            "/v2/images",
            "/healthz/",
            "*",
        ] {
            assert_eq!(route("GET", path), Routed::NotFound, "{path}");
        }
        assert_eq!(
            route("PUT", "/v1/environments/x/pause"),
            Routed::WrongMethod {
                allow: vec!["POST"]
            }
        );
        assert_eq!(
            route("POST", "/v1/images/x"),
            Routed::WrongMethod {
                allow: vec!["GET", "DELETE"]
            }
        );
        assert_eq!(
            route("get", "/healthz"),
            Routed::WrongMethod { allow: vec!["GET"] }
        );
    }

    #[test]
    fn names_are_decoded_then_validated() {
        assert_eq!(
            decode_name("environment", "feature%2Fx").ok(),
            Some("feature/x".into())
        );
        assert_eq!(
            decode_name("environment", "feature/x").ok(),
            Some("feature/x".into())
        );
        for raw in [
            "..",
            "%2e%2e",
            "a/../b",
            "a%2F..%2Fb",
            "%",
            "%2",
            "%zz",
            "%e9",
            "%00",
            "a%20b",
            "/x",
        ] {
            let err = decode_name("environment", raw).expect_err(raw);
            assert_eq!(err.status, 400, "{raw}");
        }
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            DeleteParams::parse(None).ok(),
            Some(DeleteParams { force: false })
        );
        assert_eq!(
            DeleteParams::parse(Some("force=true")).ok(),
            Some(DeleteParams { force: true })
        );
        assert!(no_query(Some("")).is_ok());
        assert_eq!(parse_mode(None).ok(), Some(None));
        assert_eq!(
            parse_mode(Some("mode=paused")).ok(),
            Some(Some(SnapshotMode::Paused))
        );
        assert_eq!(
            parse_mode(Some("mode=live")).ok(),
            Some(Some(SnapshotMode::Live))
        );
        for bad in ["mode=fast", "mode=", "mode=live&mode=live", "force=true"] {
            assert_eq!(
                parse_mode(Some(bad)).map_err(|e| e.status),
                Err(400),
                "{bad}"
            );
        }
        assert!(no_query(Some("&&")).is_ok());
        let console = ConsoleParams::parse(Some("offset=10&follow=true&limit=5")).ok();
        assert_eq!(
            console,
            Some(ConsoleParams {
                offset: 10,
                limit: 5,
                follow: true
            })
        );
        for bad in [
            "force=yes",
            "force",
            "force=",
            "force=true&force=true",
            "other=1",
            "force=%zz",
        ] {
            let err = DeleteParams::parse(Some(bad));
            assert_eq!(err.map_err(|e| e.status), Err(400), "{bad}");
        }
        for bad in [
            "offset=-1",
            "offset=+1",
            "offset=1.5",
            "offset=18446744073709551616",
            "limit=0",
            "limit=1048577",
            "follow=1",
        ] {
            let err = ConsoleParams::parse(Some(bad));
            assert_eq!(err.map_err(|e| e.status), Err(400), "{bad}");
        }
        assert_eq!(no_query(Some("x=1")).map_err(|e| e.status), Err(400));
        assert_eq!(
            FileParams::parse(Some("path=%2Fetc%2Fhostname"), false).ok(),
            Some(FileParams {
                path: "/etc/hostname".into(),
                mode: None
            })
        );
        assert_eq!(
            FileParams::parse(Some("path=/x&mode=0755"), true).ok(),
            Some(FileParams {
                path: "/x".into(),
                mode: Some(0o755)
            })
        );
        for (bad, put) in [
            ("", false),
            ("mode=0644", true),
            ("path=/x&mode=0644", false),
            ("path=/x&mode=9", true),
            ("path=/x&mode=17777", true),
            ("path=/x&mode=-1", true),
        ] {
            let err = FileParams::parse(Some(bad), put);
            assert_eq!(err.map_err(|e| e.status), Err(400), "{bad}");
        }
    }
}
