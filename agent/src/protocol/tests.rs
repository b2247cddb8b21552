use std::io::Cursor;

use super::*;

/// A reader that returns at most `step` bytes per call and an `Interrupted` error before
/// every read, like a slow socket hit by signals.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
    interrupt: bool,
}

impl Trickle {
    fn new(data: Vec<u8>, step: usize) -> Self {
        Self {
            data,
            pos: 0,
            step,
            interrupt: false,
        }
    }
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = buf.len().min(self.step).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn framed(bodies: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for body in bodies {
        write_frame(&mut out, body).expect("frame");
    }
    out
}

#[test]
fn frames_survive_one_byte_reads() {
    let bytes = framed(&[b"{\"a\":1}", b"", b"[2]"]);
    assert_eq!(&bytes[..4], &[0, 0, 0, 7]);
    let mut reader = Trickle::new(bytes, 1);
    assert_eq!(
        read_frame(&mut reader).expect("1"),
        Some(b"{\"a\":1}".to_vec())
    );
    assert_eq!(read_frame(&mut reader).expect("2"), Some(Vec::new()));
    assert_eq!(read_frame(&mut reader).expect("3"), Some(b"[2]".to_vec()));
    assert_eq!(read_frame(&mut reader).expect("eof"), None);
}

#[test]
fn eof_inside_a_frame_is_an_error() {
    let bytes = framed(&[b"hello"]);
    for cut in 1..bytes.len() {
        let error = read_frame(&mut Cursor::new(&bytes[..cut])).expect_err("truncated");
        match error {
            ProtocolError::Truncated { expected, got } if cut < 4 => {
                assert_eq!((expected, got), (4, cut));
            }
            ProtocolError::Truncated { expected, got } => {
                assert_eq!((expected, got), (5, cut - 4));
            }
            other => panic!("cut {cut}: {other}"),
        }
    }
}

#[test]
fn oversized_frames_are_refused() {
    let mut header = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
    header.extend_from_slice(b"{}");
    let error = read_frame(&mut Cursor::new(header)).expect_err("too large");
    assert!(
        matches!(error, ProtocolError::FrameTooLarge(n) if n == MAX_FRAME_BYTES + 1),
        "{error}"
    );
    // The limit itself is allowed.
    let body = vec![b' '; MAX_FRAME_BYTES];
    let bytes = framed(&[&body]);
    assert_eq!(
        read_frame(&mut Cursor::new(bytes)).expect("at the limit"),
        Some(body)
    );
    let mut sink = Vec::new();
    let error = write_frame(&mut sink, &vec![0; MAX_FRAME_BYTES + 1]).expect_err("too large");
    assert!(matches!(error, ProtocolError::FrameTooLarge(_)));
    assert!(sink.is_empty(), "nothing written");
    // A response that would not fit is refused when sending, not truncated.
    let file = Response::File {
        data: vec![0; MAX_FRAME_BYTES],
    };
    assert!(matches!(
        send_response(&mut sink, &file),
        Err(ProtocolError::FrameTooLarge(_))
    ));
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Ping {},
        Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "cat; echo done".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
            cwd: Some("/tmp".into()),
            stdin: vec![0, 1, 2, 255],
            timeout_ms: Some(1500),
        }),
        Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..ExecRequest::default()
        }),
        Request::ReadFile(ReadFileRequest {
            path: "/etc/hostname".into(),
        }),
        Request::WriteFile(WriteFileRequest {
            path: "/tmp/x".into(),
            data: b"hi\n".to_vec(),
            mode: Some(0o600),
        }),
        Request::Identity(IdentityRequest {
            hostname: "feature-x".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            address: Some(Address {
                cidr: "172.16.0.2/30".into(),
                gateway: "172.16.0.1".into(),
            }),
        }),
        Request::Reseed(ReseedRequest {
            entropy: vec![7; 64],
        }),
        Request::Clock(ClockRequest {
            unix_nanos: 1_767_225_600_123_456_789,
        }),
        Request::RunHooks(RunHooksRequest::default()),
        Request::ReportTiming {},
    ]
}

#[test]
fn requests_round_trip_with_version() {
    for request in all_requests() {
        let body = encode_request(&request).expect("encode");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["v"], 1, "{value}");
        assert_eq!(value["op"], request.op(), "{value}");
        assert_eq!(decode_request(&body).expect("decode"), request);
        let mut wire = Vec::new();
        send_request(&mut wire, &request).expect("send");
        let got = recv_request(&mut Cursor::new(wire)).expect("recv");
        assert_eq!(got, Some(request));
    }
}

#[test]
fn request_wire_form_is_as_documented() {
    let decode = |text: &str| decode_request(text.as_bytes());
    assert_eq!(
        decode(r#"{"v":1,"op":"ping"}"#).expect("ping"),
        Request::Ping {}
    );
    let exec = decode(r#"{"op":"exec","v":1,"argv":["cat"],"stdin":"aGk="}"#).expect("exec");
    assert_eq!(
        exec,
        Request::Exec(ExecRequest {
            argv: vec!["cat".into()],
            stdin: b"hi".to_vec(),
            ..ExecRequest::default()
        })
    );
    assert_eq!(
        decode(r#"{"v":1,"op":"run_hooks"}"#).expect("hooks"),
        Request::RunHooks(RunHooksRequest { timeout_ms: None })
    );
    assert_eq!(
        decode(r#"{"v":1,"op":"write_file","path":"/a","data":""}"#).expect("write"),
        Request::WriteFile(WriteFileRequest {
            path: "/a".into(),
            data: Vec::new(),
            mode: None
        })
    );
}

#[test]
fn unknown_fields_and_ops_are_rejected() {
    for text in [
        r#"{"v":1,"op":"ping","extra":1}"#,
        r#"{"v":1,"op":"run_hooks","x":null}"#,
        r#"{"v":1,"op":"exec","argv":["ls"],"shell":true}"#,
        r#"{"v":1,"op":"identity","hostname":"a","machine_id":"b","address":{"cidr":"1.2.3.4/8","gateway":"1.2.3.1","mtu":1500}}"#,
        r#"{"v":1,"op":"format_disk"}"#,
        r#"{"v":1}"#,
        r#"{"v":1,"op":"exec"}"#,
        r#"{"v":1,"op":"reseed","entropy":"not base64!"}"#,
        r#"{"v":1,"op":"clock","unix_nanos":-1}"#,
    ] {
        let error = decode_request(text.as_bytes()).expect_err(text);
        assert!(matches!(error, ProtocolError::Decode(_)), "{text}: {error}");
    }
    assert!(matches!(
        decode_request(b"[1]"),
        Err(ProtocolError::NotAnObject)
    ));
    assert!(matches!(
        decode_request(b"{\"v\":1"),
        Err(ProtocolError::Decode(_))
    ));
}

#[test]
fn version_is_checked_before_the_op() {
    for (text, got) in [
        (r#"{"op":"ping"}"#, None),
        (r#"{"v":"1","op":"ping"}"#, None),
        (r#"{"v":2,"op":"ping"}"#, Some(2)),
        (r#"{"v":0,"op":"future_op","x":1}"#, Some(0)),
    ] {
        match decode_request(text.as_bytes()) {
            Err(ProtocolError::VersionMismatch { got: g }) => assert_eq!(g, got, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn responses_round_trip() {
    let responses = vec![
        Response::Pong(Pong {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
        }),
        Response::Output {
            stream: Stream::Stderr,
            data: b"oops\n".to_vec(),
        },
        Response::Exit(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true,
        }),
        Response::File {
            data: vec![0xff; 10],
        },
        Response::Ok {},
        Response::Hooks {
            results: vec![HookResult {
                name: "10-scrub".into(),
                code: Some(0),
                signal: None,
                timed_out: false,
                output: "scrubbed\n".into(),
            }],
        },
        Response::error(ErrorCode::VersionMismatch, "speak v1"),
    ];
    for response in responses {
        let mut wire = Vec::new();
        send_response(&mut wire, &response).expect("send");
        let value: serde_json::Value = serde_json::from_slice(&wire[4..]).expect("json");
        assert_eq!(value["op"], response.op());
        assert_eq!(
            recv_response(&mut Cursor::new(wire)).expect("recv"),
            Some(response)
        );
    }
    let text = r#"{"op":"output","stream":"stdout","data":"aGk="}"#;
    assert_eq!(
        serde_json::from_str::<Response>(text).expect("output"),
        Response::Output {
            stream: Stream::Stdout,
            data: b"hi".to_vec()
        }
    );
    let text = r#"{"op":"error","code":"not_found","message":"no /x"}"#;
    assert_eq!(
        serde_json::from_str::<Response>(text).expect("error"),
        Response::error(ErrorCode::NotFound, "no /x")
    );
    for text in [
        r#"{"op":"ok","extra":true}"#,
        r#"{"op":"exit","code":0,"signal":null,"timed_out":false,"core":false}"#,
        r#"{"op":"pong","version":1,"agent_version":"x","uptime":3}"#,
    ] {
        assert!(serde_json::from_str::<Response>(text).is_err(), "{text}");
    }
}

#[test]
fn handling_time_rides_next_to_the_op_and_only_when_given() {
    let exit = Response::Exit(ExitStatus {
        code: Some(0),
        signal: None,
        timed_out: false,
    });
    // Without a time the body is exactly what hosts older than the field accept.
    let plain = encode_response(&exit, None).expect("encode");
    assert_eq!(
        serde_json::from_slice::<Response>(&plain).expect("strict"),
        exit
    );
    let timed = encode_response(&exit, Some(1234)).expect("encode");
    let value: serde_json::Value = serde_json::from_slice(&timed).expect("json");
    assert_eq!(value[HANDLED_US_FIELD], 1234, "{value}");
    assert_eq!(value["op"], "exit", "{value}");
    assert!(
        serde_json::from_slice::<Response>(&timed).is_err(),
        "strict hosts reject it"
    );
    assert_eq!(
        decode_answer(&timed).expect("decode"),
        Answer {
            response: exit.clone(),
            handled_us: Some(1234)
        }
    );
    assert_eq!(decode_answer(&plain).expect("decode").handled_us, None);
    // recv_response accepts the field and drops it.
    let mut wire = Vec::new();
    write_frame(&mut wire, &timed).expect("frame");
    assert_eq!(
        recv_response(&mut Cursor::new(wire)).expect("recv"),
        Some(exit)
    );
    for text in [
        r#"{"op":"ok","handled_us":-1}"#,
        r#"{"op":"ok","handled_us":"5"}"#,
        r#"{"op":"ok","handled_us":1.5}"#,
        r#"{"op":"ok","handled_us":5,"extra":1}"#,
    ] {
        assert!(decode_answer(text.as_bytes()).is_err(), "{text}");
    }
}

#[test]
fn whole_frames_are_recognised_in_a_buffer() {
    let two = framed(&[b"{}", b"[1]"]);
    assert!(starts_with_frame(&two));
    assert!(starts_with_frame(&two[..6]), "exactly one frame");
    assert!(!starts_with_frame(&two[..5]), "body incomplete");
    assert!(!starts_with_frame(&two[..3]), "header incomplete");
    assert!(!starts_with_frame(&[]));
    assert!(starts_with_frame(&framed(&[b""])), "an empty body is whole");
    let huge = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
    assert!(
        starts_with_frame(&huge),
        "too large is known without the body"
    );
    let mut out = Vec::new();
    append_frame(&mut out, b"{}").expect("append");
    append_frame(&mut out, b"[1]").expect("append");
    assert_eq!(out, two);
}
