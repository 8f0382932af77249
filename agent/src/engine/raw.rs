//! A minimal HTTP/1.1 client on the engine's socket, for the answers that
//! bollard's generated models refuse.
//!
//! bollard-stubs decodes states and event types into closed enums. Podman
//! 4.3 reports values Docker never does (`"State": "stopped"`,
//! `"Type": "pod"`), and one such value fails the decoding of a whole
//! listing: one odd container would blind the agent. These calls return
//! plain `serde_json::Value`s that [`super::model`] reads leniently.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use super::error::{BoxError, EngineError};
use super::Result;

/// Largest JSON answer read whole: a listing of a few thousand containers.
const MAX_JSON_BYTES: usize = 64 << 20;
/// Largest error answer read for its message.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// Longest line of a streamed answer; events are well under 4 KiB.
const MAX_LINE_BYTES: usize = 1 << 20;

/// A stream of JSON lines, one value each.
pub(crate) type JsonLines = Pin<Box<dyn Stream<Item = Result<Value>> + Send>>;

#[derive(Debug, Clone)]
pub(crate) struct RawClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Aborts the connection task when the answer is dropped, so that a
/// stream given up half-way closes its socket.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Answer {
    response: Response<Incoming>,
    _connection: AbortOnDrop,
}

impl RawClient {
    pub(crate) fn new(socket: &Path, timeout: Duration) -> RawClient {
        RawClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    fn unreachable(&self, source: impl Into<BoxError>) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.clone(),
            source: source.into(),
        }
    }

    fn timed_out(&self, what: &str) -> EngineError {
        self.unreachable(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer about {what} within {}",
                humantime::format_duration(self.timeout)
            ),
        ))
    }

    /// Sends a bodiless request on a fresh connection and waits for the
    /// answer's head. One connection per request: the engine is local, and
    /// nothing is pooled that could go stale.
    async fn send(&self, method: Method, path_and_query: &str) -> Result<Answer> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "engine connection ended with an error");
            }
        });
        let connection = AbortOnDrop(task);
        // Podman (Go's HTTP server) refuses HTTP/1.1 requests without Host.
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, HeaderValue::from_static("localhost"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| EngineError::Client(Box::new(e)))?;
        let response = sender.send_request(request).await.map_err(|e| self.unreachable(e))?;
        Ok(Answer {
            response,
            _connection: connection,
        })
    }

    /// `GET path` and its JSON answer; refusals are sorted as for bollard,
    /// with `what` naming the object.
    pub(crate) async fn get_json(&self, path_and_query: &str, what: &str) -> Result<Value> {
        let exchange = async {
            let answer = self.send(Method::GET, path_and_query).await?;
            let status = answer.response.status();
            if !status.is_success() {
                return Err(refusal(answer, what).await);
            }
            let body = Limited::new(answer.response.into_body(), MAX_JSON_BYTES)
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| EngineError::Decode {
                what: what.to_owned(),
                message: e.to_string(),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.timed_out(what))?
    }

    /// `GET path` answered by a stream of JSON lines that may never end,
    /// such as `/events`. Only the answer's head is timed. An error object
    /// in the stream (Podman writes one after its 200 when it fails later)
    /// ends the stream with `Api`.
    pub(crate) async fn get_lines(&self, path_and_query: &str, what: &str) -> Result<JsonLines> {
        let answer = tokio::time::timeout(self.timeout, self.send(Method::GET, path_and_query))
            .await
            .map_err(|_| self.timed_out(what))??;
        if !answer.response.status().is_success() {
            return Err(refusal(answer, what).await);
        }
        let (parts, body) = answer.response.into_parts();
        let state = LineState {
            body,
            _connection: answer._connection,
            buffer: BytesMut::new(),
            done: false,
            status: parts.status.as_u16(),
            what: what.to_owned(),
            socket: self.socket.clone(),
        };
        Ok(Box::pin(futures_util::stream::unfold(state, LineState::next)))
    }
}

struct LineState {
    body: Incoming,
    _connection: AbortOnDrop,
    buffer: BytesMut,
    done: bool,
    status: u16,
    what: String,
    socket: PathBuf,
}

impl LineState {
    async fn next(mut self) -> Option<(Result<Value>, LineState)> {
        loop {
            if self.done && self.buffer.is_empty() {
                return None;
            }
            if let Some(line) = self.take_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let item = self.decode(&line);
                if item.is_err() {
                    // Nothing after an error can be trusted to line up.
                    self.done = true;
                    self.buffer.clear();
                }
                return Some((item, self));
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                self.done = true;
                self.buffer.clear();
                let err = EngineError::Decode {
                    what: self.what.clone(),
                    message: format!("a line longer than {MAX_LINE_BYTES} bytes"),
                };
                return Some((Err(err), self));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.buffer.clear();
                    let err = EngineError::Unreachable {
                        socket: self.socket.clone(),
                        source: Box::new(e),
                    };
                    return Some((Err(err), self));
                }
                None => {
                    // The answer ended; a last line may lack its newline.
                    self.done = true;
                    if !self.buffer.is_empty() && !self.buffer.ends_with(b"\n") {
                        self.buffer.extend_from_slice(b"\n");
                    }
                }
            }
        }
    }

    fn take_line(&mut self) -> Option<BytesMut> {
        let end = self.buffer.iter().position(|&b| b == b'\n')?;
        let mut line = self.buffer.split_to(end + 1);
        line.truncate(end);
        Some(line)
    }

    fn decode(&self, line: &[u8]) -> Result<Value> {
        let value: Value = serde_json::from_slice(line).map_err(|e| EngineError::Decode {
            what: self.what.clone(),
            message: e.to_string(),
        })?;
        match error_message(&value) {
            Some(message) => Err(EngineError::Api {
                status: value
                    .get("response")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(self.status),
                message,
            }),
            None => Ok(value),
        }
    }
}

/// The message of a Podman error object, `{"cause", "message", "response"}`.
fn error_message(value: &Value) -> Option<String> {
    let object = value.as_object()?;
    if object.contains_key("Type") || object.contains_key("Action") || !object.contains_key("response") {
        return None;
    }
    object.get("message").and_then(Value::as_str).map(str::to_owned)
}

/// Reads a refusal's message (Podman sends `{"message": …}`) and sorts it.
async fn refusal(answer: Answer, what: &str) -> EngineError {
    let status = answer.response.status().as_u16();
    let body = Limited::new(answer.response.into_body(), MAX_ERROR_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    EngineError::from_status(status, message, || what.to_owned())
}

/// Percent-encodes `text` for a path segment or a query value: everything
/// but RFC 3986's unreserved characters.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_leaves_unreserved_characters_and_escapes_the_rest() {
        assert_eq!(encode("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(encode(r#"{"type":["pod"]}"#), "%7B%22type%22%3A%5B%22pod%22%5D%7D");
    }

    #[test]
    fn a_podman_error_object_is_an_error_but_an_event_is_not() {
        let err: Value = serde_json::json!({"cause": "x", "message": "boom", "response": 500});
        assert_eq!(error_message(&err).as_deref(), Some("boom"));
        let event: Value = serde_json::json!({"Type": "pod", "Action": "stop", "message": "m", "response": 1});
        assert_eq!(error_message(&event), None);
    }
}
