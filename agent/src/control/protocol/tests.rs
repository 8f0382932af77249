use super::*;
use crate::orchestrator::{OrchestratorError, PullAttempt};
use crate::registry::commands::NewRegistry;

fn parse_call(line: &str) -> Result<Call, RpcError> {
    let req = Request::parse(line.as_bytes()).map_err(|r| r.error)?;
    Call::parse(&req.method, req.params)
}

#[test]
fn well_formed_requests_become_typed_calls() {
    let call = parse_call(r#"{"jsonrpc":"2.0","id":1,"method":"container-logs","params":{"app":"electrs","tail":50}}"#);
    assert_eq!(
        call,
        Ok(Call::Logs {
            app: "electrs".into(),
            tail: Some(50)
        })
    );
    assert_eq!(
        parse_call(r#"{"jsonrpc":"2.0","id":"x","method":"container-list"}"#),
        Ok(Call::List)
    );
    let add = parse_call(
        r#"{"jsonrpc":"2.0","id":2,"method":"registry.add","params":{"name":"lan","url":"https://m.lan","username":"me","password":"pw"}}"#,
    )
    .expect("parses");
    let Call::RegistryAdd(new) = add else { panic!("{add:?}") };
    assert_eq!(new.priority, crate::registry::DEFAULT_PRIORITY);
    assert_eq!(new.password.as_deref(), Some("pw"));
}

#[test]
fn a_request_without_an_id_is_a_notification() {
    let req = Request::parse(br#"{"jsonrpc":"2.0","method":"container-list"}"#).expect("parses");
    assert_eq!(req.id, None);
    let req = Request::parse(br#"{"jsonrpc":"2.0","method":"container-list","id":null}"#).expect("parses");
    assert_eq!(req.id, Some(Value::Null));
}

#[test]
fn malformed_json_is_a_parse_error_with_a_null_id() {
    let refusal = Request::parse(b"{\"jsonrpc\": \"2.0\", \"method\": ").expect_err("malformed");
    assert_eq!(refusal.error.code, PARSE_ERROR);
    assert_eq!(refusal.id, Value::Null);
    assert!(refusal.error.message.starts_with("parse error: "), "{}", refusal.error);
}

#[test]
fn envelope_problems_are_invalid_requests_that_say_what_is_wrong() {
    for (line, says) in [
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"container-list"}]"#,
            "batch requests are not supported",
        ),
        (r#""container-list""#, "expected a request object, got a string"),
        (r#"{"id":1,"method":"container-list"}"#, r#""jsonrpc" must be "2.0""#),
        (
            r#"{"jsonrpc":"1.0","id":1,"method":"container-list"}"#,
            r#""jsonrpc" must be "2.0""#,
        ),
        (r#"{"jsonrpc":"2.0","id":1}"#, r#""method" is missing"#),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#""method" must be a string, not a number"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":{},"method":"container-list"}"#,
            r#""id" must be a string"#,
        ),
        (
            r#"{"jsonrpc":"2.0","ID":1,"method":"container-list"}"#,
            r#"unknown member "ID""#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-list","params":"x"}"#,
            r#""params" must be an object"#,
        ),
    ] {
        let refusal = Request::parse(line.as_bytes()).expect_err(line);
        assert_eq!(refusal.error.code, INVALID_REQUEST, "{line}: {}", refusal.error);
        assert!(refusal.error.message.contains(says), "{line}: {}", refusal.error);
    }
}

#[test]
fn an_invalid_request_keeps_a_readable_id() {
    let refusal = Request::parse(br#"{"jsonrpc":"2.0","id":42}"#).expect_err("no method");
    assert_eq!(refusal.id, json!(42));
}

#[test]
fn an_unknown_method_is_named_and_every_valid_one_listed() {
    let e = parse_call(r#"{"jsonrpc":"2.0","id":1,"method":"container-explode"}"#).expect_err("unknown");
    assert_eq!(e.code, METHOD_NOT_FOUND);
    assert!(e.message.contains("\"container-explode\""), "{e}");
    for (name, _) in METHODS {
        assert!(e.message.contains(name), "{name} missing from: {e}");
    }
    let data = e.data.expect("data");
    assert_eq!(data["valid"].as_array().map(Vec::len), Some(METHODS.len()));
}

#[test]
fn invalid_params_name_the_param_and_what_is_allowed() {
    let cases = [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-status","params":{}}"#,
            "app",
            r#"invalid params for container-status: "app" is required (an app id)"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-status","params":{"app":7}}"#,
            "app",
            r#""app" must be a string, not a number"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-logs","params":{"app":"a","tail":-1}}"#,
            "tail",
            r#""tail" must be a non-negative integer"#,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-logs","params":{"app":"a","lines":3}}"#,
            "lines",
            "is not a param of container-logs, which takes app, tail",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-list","params":{"app":"a"}}"#,
            "app",
            "which takes no params",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-status","params":["a"]}"#,
            "",
            "params go by name",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"container-install","params":{"manifest":"rel/manifest.yml"}}"#,
            "manifest",
            "must be an absolute path",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"registry.add","params":{"name":"x","url":"https://x","priority":"high"}}"#,
            "priority",
            r#""priority" must be an integer"#,
        ),
    ];
    for (line, param, says) in cases {
        let e = parse_call(line).expect_err(line);
        assert_eq!(e.code, INVALID_PARAMS, "{line}: {e}");
        assert!(e.message.contains(says), "{line}: {e}");
        if !param.is_empty() {
            assert_eq!(
                e.data.as_ref().map(|d| d["param"].clone()),
                Some(json!(param)),
                "{line}"
            );
        }
    }
}

#[test]
fn a_password_of_the_wrong_type_is_not_echoed() {
    let line = r#"{"jsonrpc":"2.0","id":1,"method":"registry.add","params":{"name":"x","url":"https://x","username":"me","password":["hunter2"]}}"#;
    let e = parse_call(line).expect_err("array password");
    assert_eq!(e.code, INVALID_PARAMS);
    let text = serde_json::to_string(&e).expect("serializes");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        e.message.contains(r#""password" must be a string, not an array"#),
        "{e}"
    );
}

#[test]
fn new_registry_debug_hides_the_password() {
    let new = NewRegistry {
        name: "lan".into(),
        url: "https://me:swordfish@m.lan".into(),
        priority: 1,
        username: Some("me".into()),
        password: Some("hunter2".into()),
    };
    let debug = format!("{:?}", Call::RegistryAdd(new));
    assert!(!debug.contains("hunter2") && debug.contains("<hidden>"), "{debug}");
    assert!(!debug.contains("swordfish") && debug.contains("@m.lan"), "{debug}");
}

#[test]
fn every_method_parses_with_its_params_and_names_itself() {
    let params = |m: &str| match m {
        "container-install" | "container-logs" => json!({"app": "a"}),
        m if m.starts_with("container-") && m != "container-list" => json!({"app": "a"}),
        "registry.add" => json!({"name": "n", "url": "https://x"}),
        "registry.remove" => json!({"name": "n"}),
        "os.update" => json!({"source": "/var/lib/archipelago/state/b.raucb"}),
        _ => json!({}),
    };
    for (name, _) in METHODS {
        let Value::Object(p) = params(name) else { unreachable!() };
        let call = Call::parse(name, p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(call.method(), *name);
    }
}

#[test]
fn typed_orchestrator_errors_survive_the_round_trip() {
    let attempts = vec![PullAttempt {
        registry: "lan".into(),
        reference: "lan/x@sha256:00".into(),
        error: Some("not found".into()),
        elapsed_ms: 3,
    }];
    let originals = [
        OrchestratorError::UnknownApp {
            app: "nope".into(),
            known: vec!["a".into(), "b".into()],
        },
        OrchestratorError::NotInstalled {
            app: "a".into(),
            container: "a".into(),
        },
        OrchestratorError::PullFailed {
            app: "a".into(),
            image: "x@sha256:00".into(),
            attempts,
        },
        OrchestratorError::UpgradeFailed {
            app: "a".into(),
            reason: "unhealthy".into(),
            rolled_back: true,
        },
        OrchestratorError::AlreadyExists {
            app: "a".into(),
            container: "a".into(),
        },
        OrchestratorError::DevOnly,
        OrchestratorError::Other(anyhow::anyhow!("disk full").context("cannot write")),
    ];
    for original in originals {
        let rpc = from_orchestrator(&original);
        let wire: RpcError = serde_json::from_str(&serde_json::to_string(&rpc).expect("ser")).expect("de");
        let back = into_orchestrator(wire);
        assert_eq!(format!("{back:#}"), format!("{original:#}"));
        assert_eq!(
            std::mem::discriminant(&back),
            std::mem::discriminant(&original),
            "{original:?}"
        );
    }
    assert_eq!(
        from_orchestrator(&OrchestratorError::Other(
            anyhow::anyhow!("disk full").context("cannot write")
        ))
        .message,
        "cannot write: disk full"
    );
}

#[test]
fn responses_are_one_line_with_result_or_error() {
    let ok = Response::new(json!(1), Ok(json!({"a": "x\ny"}))).to_line();
    assert!(ok.ends_with('\n') && ok.matches('\n').count() == 1, "{ok}");
    assert_eq!(
        serde_json::from_str::<Value>(&ok).expect("json"),
        json!({"jsonrpc": "2.0", "id": 1, "result": {"a": "x\ny"}})
    );
    let err = Response::new(Value::Null, Err(RpcError::new(SERVER_ERROR, "boom"))).to_line();
    assert_eq!(
        serde_json::from_str::<Value>(&err).expect("json"),
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32000, "message": "boom"}})
    );
}

#[test]
fn os_update_takes_an_absolute_path_or_a_url_and_a_boolean() {
    let parse = |p: Value| {
        let Value::Object(p) = p else { unreachable!() };
        Call::parse("os.update", p)
    };
    assert_eq!(
        parse(json!({"source": "https://example.org/a.raucb", "allow_downgrade": true})).expect("a URL"),
        Call::OsUpdate {
            source: "https://example.org/a.raucb".into(),
            allow_downgrade: true
        }
    );
    let e = parse(json!({"source": "b.raucb"})).expect_err("a relative path");
    assert!(e.message.contains("must be an absolute path"), "{e}");
    let e = parse(json!({"source": "/b", "allow_downgrade": "yes"})).expect_err("a string flag");
    assert!(e.message.contains("must be a boolean"), "{e}");
    assert!(parse(json!({})).expect_err("no source").message.contains("is required"));
}
