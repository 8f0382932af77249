//! The control socket's wire format: JSON-RPC 2.0, one request per line.
//!
//! Pure: parsing a line into a typed [`Call`], and turning results and
//! errors into response lines. The socket itself is in `server.rs`; the
//! format is documented for humans in `docs/control.md`.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::orchestrator::{OrchestratorError, PullAttempt};
use crate::registry::commands::NewRegistry;

/// A request line longer than this is refused and its connection closed:
/// no request needs more, and reading on would let one client take the
/// agent's memory.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Standard JSON-RPC 2.0 codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// Application codes, in the range JSON-RPC leaves to servers. Each typed
/// [`OrchestratorError`] has its own, so a client can rebuild it.
pub const SERVER_ERROR: i64 = -32000;
pub const UNKNOWN_APP: i64 = -32001;
pub const NOT_INSTALLED: i64 = -32002;
pub const PULL_FAILED: i64 = -32003;
pub const UPGRADE_FAILED: i64 = -32004;
pub const ALREADY_EXISTS: i64 = -32005;
pub const UNKNOWN_REGISTRY: i64 = -32006;
/// The method needs something this server does not have (`reconcile-now`
/// without a reconcile loop), or the server is at its connection limit.
pub const UNAVAILABLE: i64 = -32007;
pub const DEV_ONLY: i64 = -32008;
/// Client side only, never sent by the agent: the connection broke or the
/// answer was not a JSON-RPC response.
pub const TRANSPORT_ERROR: i64 = -32099;

/// Every method, with the named params it takes.
pub const METHODS: &[(&str, &[&str])] = &[
    ("container-install", &["app", "manifest"]),
    ("container-start", &["app"]),
    ("container-stop", &["app"]),
    ("container-restart", &["app"]),
    ("container-remove", &["app"]),
    ("container-upgrade", &["app"]),
    ("container-status", &["app"]),
    ("container-list", &[]),
    ("container-logs", &["app", "tail"]),
    ("container-health", &["app"]),
    ("registry.list", &[]),
    ("registry.add", &["name", "url", "priority", "username", "password"]),
    ("registry.remove", &["name"]),
    ("registry.test", &["name"]),
    ("reconcile-now", &[]),
];

/// The params `method` takes (empty for an unknown method).
pub fn params_of(method: &str) -> &'static [&'static str] {
    METHODS
        .iter()
        .find(|(name, _)| *name == method)
        .map_or(&[], |(_, params)| params)
}

/// Echoed names (methods, params) are cut to this many characters, so an
/// error message stays a message.
const MAX_ECHO_CHARS: usize = 64;

/// A JSON-RPC error object. Its `Display` is the message alone, as
/// `error: {e:#}` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_code(mut self, code: i64) -> RpcError {
        self.code = code;
        self
    }

    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }

    /// Any other failure, with its whole chain of causes.
    pub fn server(e: &(dyn std::error::Error + 'static)) -> RpcError {
        RpcError::new(SERVER_ERROR, crate::error_chain(e))
    }

    fn invalid_request(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_REQUEST, format!("invalid request: {}", message.into()))
    }

    fn method_not_found(method: &str) -> RpcError {
        let valid: Vec<&str> = METHODS.iter().map(|(name, _)| *name).collect();
        RpcError::new(
            METHOD_NOT_FOUND,
            format!(
                "method not found: {:?}; valid methods: {}",
                echo(method),
                valid.join(", ")
            ),
        )
        .with_data(json!({ "method": echo(method), "valid": valid }))
    }

    /// Invalid params for `method`: `param` is named and what it allows
    /// said. The value sent is never repeated: it may be a password.
    pub fn invalid_param(method: &str, param: &str, problem: impl fmt::Display, allowed: &[&str]) -> RpcError {
        RpcError::invalid_params(method, param, format!("{:?} {problem}", echo(param)), allowed)
    }

    /// Invalid params for `method`, where `message` already names `param`
    /// (a validation error of the value, such as a registry url's).
    pub fn invalid_params(method: &str, param: &str, message: impl fmt::Display, allowed: &[&str]) -> RpcError {
        RpcError::new(INVALID_PARAMS, format!("invalid params for {method}: {message}"))
            .with_data(json!({ "param": echo(param), "allowed": allowed }))
    }
}

fn echo(s: &str) -> String {
    if s.chars().count() <= MAX_ECHO_CHARS {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX_ECHO_CHARS).collect::<String>())
    }
}

/// What `container-install` installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallTarget {
    /// An app of the agent's apps folder.
    App(String),
    /// A manifest file anywhere, by absolute path (dev-mode agents only).
    Manifest(PathBuf),
}

/// One method call with its params checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Install(InstallTarget),
    Start { app: String },
    Stop { app: String },
    Restart { app: String },
    Remove { app: String },
    Upgrade { app: String },
    Status { app: String },
    List,
    Logs { app: String, tail: Option<usize> },
    Health { app: String },
    RegistryList,
    RegistryAdd(NewRegistry),
    RegistryRemove { name: String },
    RegistryTest { name: Option<String> },
    ReconcileNow,
}

impl Call {
    /// The method name this call came from (for logs).
    pub fn method(&self) -> &'static str {
        match self {
            Call::Install(_) => "container-install",
            Call::Start { .. } => "container-start",
            Call::Stop { .. } => "container-stop",
            Call::Restart { .. } => "container-restart",
            Call::Remove { .. } => "container-remove",
            Call::Upgrade { .. } => "container-upgrade",
            Call::Status { .. } => "container-status",
            Call::List => "container-list",
            Call::Logs { .. } => "container-logs",
            Call::Health { .. } => "container-health",
            Call::RegistryList => "registry.list",
            Call::RegistryAdd(_) => "registry.add",
            Call::RegistryRemove { .. } => "registry.remove",
            Call::RegistryTest { .. } => "registry.test",
            Call::ReconcileNow => "reconcile-now",
        }
    }

    /// Checks `params` against `method` and builds the call.
    pub fn parse(method: &str, params: Map<String, Value>) -> Result<Call, RpcError> {
        let Some((method, allowed)) = METHODS.iter().find(|(name, _)| *name == method).copied() else {
            return Err(RpcError::method_not_found(method));
        };
        let mut p = Params::new(method, allowed, params)?;
        let call = match method {
            "container-install" => match (p.string("app")?, p.string("manifest")?) {
                (Some(app), None) => Call::Install(InstallTarget::App(app)),
                (None, Some(path)) => {
                    let path = PathBuf::from(path);
                    if !path.is_absolute() {
                        return Err(p.invalid("manifest", "must be an absolute path"));
                    }
                    Call::Install(InstallTarget::Manifest(path))
                }
                (Some(_), Some(_)) => return Err(p.invalid("manifest", "cannot be given together with \"app\"")),
                (None, None) => return Err(p.invalid("app", "is required (an app id), or \"manifest\" instead")),
            },
            "container-start" => Call::Start { app: p.app()? },
            "container-stop" => Call::Stop { app: p.app()? },
            "container-restart" => Call::Restart { app: p.app()? },
            "container-remove" => Call::Remove { app: p.app()? },
            "container-upgrade" => Call::Upgrade { app: p.app()? },
            "container-status" => Call::Status { app: p.app()? },
            "container-list" => Call::List,
            "container-logs" => Call::Logs {
                app: p.app()?,
                tail: p.count("tail")?,
            },
            "container-health" => Call::Health { app: p.app()? },
            "registry.list" => Call::RegistryList,
            "registry.add" => Call::RegistryAdd(NewRegistry {
                name: p.required("name", "a registry name")?,
                url: p.required("url", "a registry url")?,
                priority: p.priority("priority")?.unwrap_or(crate::registry::DEFAULT_PRIORITY),
                username: p.string("username")?,
                password: p.string("password")?,
            }),
            "registry.remove" => Call::RegistryRemove {
                name: p.required("name", "a registry name")?,
            },
            "registry.test" => Call::RegistryTest {
                name: p.string("name")?,
            },
            "reconcile-now" => Call::ReconcileNow,
            other => return Err(RpcError::method_not_found(other)),
        };
        Ok(call)
    }
}

/// Named params being taken apart for one method.
struct Params {
    method: &'static str,
    allowed: &'static [&'static str],
    map: Map<String, Value>,
}

impl Params {
    /// Refuses any param the method does not take.
    fn new(
        method: &'static str,
        allowed: &'static [&'static str],
        map: Map<String, Value>,
    ) -> Result<Params, RpcError> {
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let takes = if allowed.is_empty() {
                "takes no params".to_owned()
            } else {
                format!("takes {}", allowed.join(", "))
            };
            return Err(RpcError::invalid_param(
                method,
                unknown,
                format!("is not a param of {method}, which {takes}"),
                allowed,
            ));
        }
        Ok(Params { method, allowed, map })
    }

    fn invalid(&self, param: &str, problem: &str) -> RpcError {
        RpcError::invalid_param(self.method, param, problem, self.allowed)
    }

    /// A string param; `null` counts as absent.
    fn string(&mut self, name: &str) -> Result<Option<String>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(name, &format!("must be a string, not {}", kind(&other)))),
        }
    }

    fn required(&mut self, name: &str, what: &str) -> Result<String, RpcError> {
        self.string(name)?
            .ok_or_else(|| self.invalid(name, &format!("is required ({what})")))
    }

    fn app(&mut self) -> Result<String, RpcError> {
        self.required("app", "an app id")
    }

    /// A non-negative integer param.
    fn count(&mut self, name: &str) -> Result<Option<usize>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(name, "must be a non-negative integer")),
        }
    }

    fn priority(&mut self, name: &str) -> Result<Option<i32>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(name, "must be an integer (lower is tried first)")),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A request line, checked as far as the envelope goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None` for a notification, which gets no response.
    pub id: Option<Value>,
    pub method: String,
    pub params: Map<String, Value>,
}

/// Why a line is not a request: the error and the id to answer with
/// (`null` when the id could not be read).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Value,
    pub error: RpcError,
}

const MEMBERS: &[&str] = &["jsonrpc", "method", "params", "id"];

impl Request {
    /// Reads one line as a JSON-RPC 2.0 request object. Batches (arrays)
    /// are refused: every client here sends one call at a time.
    pub fn parse(line: &[u8]) -> Result<Request, Refusal> {
        let refuse = |id: Value, error: RpcError| Refusal { id, error };
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| refuse(Value::Null, RpcError::new(PARSE_ERROR, format!("parse error: {e}"))))?;
        let mut obj = match value {
            Value::Object(obj) => obj,
            Value::Array(_) => {
                return Err(refuse(
                    Value::Null,
                    RpcError::invalid_request("batch requests are not supported; send one request object per line"),
                ))
            }
            other => {
                return Err(refuse(
                    Value::Null,
                    RpcError::invalid_request(format!("expected a request object, got {}", kind(&other))),
                ))
            }
        };
        let id = match obj.remove("id") {
            None => None,
            Some(id @ (Value::Null | Value::String(_) | Value::Number(_))) => Some(id),
            Some(other) => {
                return Err(refuse(
                    Value::Null,
                    RpcError::invalid_request(format!(
                        "\"id\" must be a string, a number or null, not {}",
                        kind(&other)
                    )),
                ))
            }
        };
        let answer_id = id.clone().unwrap_or(Value::Null);
        if let Some(unknown) = obj.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
            return Err(refuse(
                answer_id,
                RpcError::invalid_request(format!(
                    "unknown member {:?}; a request has only {}",
                    echo(unknown),
                    MEMBERS.join(", ")
                )),
            ));
        }
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(refuse(
                answer_id,
                RpcError::invalid_request("\"jsonrpc\" must be \"2.0\""),
            ));
        }
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            Some(other) => {
                return Err(refuse(
                    answer_id,
                    RpcError::invalid_request(format!("\"method\" must be a string, not {}", kind(&other))),
                ))
            }
            None => return Err(refuse(answer_id, RpcError::invalid_request("\"method\" is missing"))),
        };
        let params = match obj.remove("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p,
            Some(Value::Array(_)) => {
                return Err(refuse(
                    answer_id,
                    RpcError::new(
                        INVALID_PARAMS,
                        format!("invalid params for {}: params go by name, as an object (e.g. {{\"app\": \"electrs\"}}), not by position", echo(&method)),
                    ),
                ))
            }
            Some(other) => {
                return Err(refuse(
                    answer_id,
                    RpcError::invalid_request(format!("\"params\" must be an object, not {}", kind(&other))),
                ))
            }
        };
        Ok(Request { id, method, params })
    }
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn new(id: Value, outcome: Result<Value, RpcError>) -> Response {
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Response {
            jsonrpc: "2.0".to_owned(),
            id,
            result,
            error,
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing a Value-based struct cannot fail (string keys only);
        // the fallback keeps the promise of one line per request anyway.
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{INTERNAL_ERROR},"message":{}}}}}"#,
                Value::String(format!("cannot encode the response: {e}"))
            )
        });
        line.push('\n');
        line
    }
}

/// The RPC error for an orchestrator error: a code per typed variant, its
/// fields in `data`, and the whole chain of causes as the message.
pub fn from_orchestrator(e: &OrchestratorError) -> RpcError {
    let message = crate::error_chain(e);
    match e {
        OrchestratorError::UnknownApp { app, known } => {
            RpcError::new(UNKNOWN_APP, message).with_data(json!({ "app": app, "known": known }))
        }
        OrchestratorError::NotInstalled { app, container } => {
            RpcError::new(NOT_INSTALLED, message).with_data(json!({ "app": app, "container": container }))
        }
        OrchestratorError::PullFailed { app, image, attempts } => {
            RpcError::new(PULL_FAILED, message).with_data(json!({ "app": app, "image": image, "attempts": attempts }))
        }
        OrchestratorError::UpgradeFailed {
            app,
            reason,
            rolled_back,
        } => RpcError::new(UPGRADE_FAILED, message)
            .with_data(json!({ "app": app, "reason": reason, "rolled_back": rolled_back })),
        OrchestratorError::AlreadyExists { app, container } => {
            RpcError::new(ALREADY_EXISTS, message).with_data(json!({ "app": app, "container": container }))
        }
        OrchestratorError::DevOnly => RpcError::new(DEV_ONLY, message),
        OrchestratorError::Naming(_) | OrchestratorError::Engine { .. } | OrchestratorError::Other(_) => {
            RpcError::new(SERVER_ERROR, message)
        }
    }
}

/// The orchestrator error an RPC error stands for: the typed variant back
/// when the code and data name one, else `Other` with the agent's message.
pub fn into_orchestrator(e: RpcError) -> OrchestratorError {
    fn field<T: serde::de::DeserializeOwned>(data: &Option<Value>, name: &str) -> Option<T> {
        serde_json::from_value(data.as_ref()?.get(name)?.clone()).ok()
    }
    let d = &e.data;
    let typed = match e.code {
        UNKNOWN_APP => field(d, "app")
            .zip(field(d, "known"))
            .map(|(app, known)| OrchestratorError::UnknownApp { app, known }),
        NOT_INSTALLED => field(d, "app")
            .zip(field(d, "container"))
            .map(|(app, container)| OrchestratorError::NotInstalled { app, container }),
        PULL_FAILED => field(d, "app")
            .zip(field(d, "image"))
            .zip(field::<Vec<PullAttempt>>(d, "attempts"))
            .map(|((app, image), attempts)| OrchestratorError::PullFailed { app, image, attempts }),
        UPGRADE_FAILED => field(d, "app")
            .zip(field(d, "reason"))
            .zip(field(d, "rolled_back"))
            .map(|((app, reason), rolled_back)| OrchestratorError::UpgradeFailed {
                app,
                reason,
                rolled_back,
            }),
        ALREADY_EXISTS => field(d, "app")
            .zip(field(d, "container"))
            .map(|(app, container)| OrchestratorError::AlreadyExists { app, container }),
        DEV_ONLY => Some(OrchestratorError::DevOnly),
        _ => None,
    };
    typed.unwrap_or_else(|| OrchestratorError::Other(anyhow::Error::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_call(line: &str) -> Result<Call, RpcError> {
        let req = Request::parse(line.as_bytes()).map_err(|r| r.error)?;
        Call::parse(&req.method, req.params)
    }

    #[test]
    fn well_formed_requests_become_typed_calls() {
        let call =
            parse_call(r#"{"jsonrpc":"2.0","id":1,"method":"container-logs","params":{"app":"electrs","tail":50}}"#);
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
}
