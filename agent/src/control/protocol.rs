//! The control socket's wire format: JSON-RPC 2.0, one request per line.
//!
//! Pure: parsing a line into a request envelope, its method and params
//! into a typed [`Call`] (`call.rs`), and turning results and errors into
//! response lines, typed orchestrator errors with their fields
//! (`orchestrator_error.rs`). The socket itself is in `server.rs`; the
//! format is documented for humans in `docs/control.md`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

mod call;
mod orchestrator_error;

pub use call::{Call, InstallTarget};
pub use orchestrator_error::{from_orchestrator, into_orchestrator};

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
    ("os.status", &[]),
    ("os.update", &["source", "allow_downgrade"]),
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

#[cfg(test)]
mod tests;
