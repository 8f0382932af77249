//! The socket side: binding (and replacing a stale socket file), accepting
//! connections, one response line per request line, and a clean shutdown.

use std::fs::{self, Permissions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::protocol::{Call, Request, Response, RpcError, INVALID_REQUEST, MAX_LINE_BYTES, UNAVAILABLE};
use super::ControlHandler;

/// Owner and group may connect; the group is how a node grants the right.
const SOCKET_MODE: u32 = 0o660;
/// How long `serve` waits for an existing socket to answer before calling
/// it live-but-stuck rather than stale.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds on what clients may take.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// A longer request line is refused and its connection closed.
    pub max_line_bytes: usize,
    /// Connections beyond this get one error line and are closed.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            max_line_bytes: MAX_LINE_BYTES,
            max_connections: 64,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Serves `handler` on a unix socket at `path` until `shutdown` completes,
/// with the default [`ServeLimits`].
///
/// A socket file nobody answers on is a leftover and is replaced; one a
/// live process answers on is refused, as is any other kind of file. On
/// shutdown it stops accepting, lets requests being handled finish (idle
/// connections are closed), and removes the socket file.
pub async fn serve(
    path: &Path,
    handler: Arc<dyn ControlHandler>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(path, handler, ServeLimits::default(), shutdown).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    path: &Path,
    handler: Arc<dyn ControlHandler>,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = bind(path).await?;
    tracing::info!(socket = %path.display(), "control socket listening");
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Running out of file descriptors, typically: the
                        // next accept may work once connections close.
                        tracing::warn!(error = %e, socket = %path.display(), "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(limit = limits.max_connections, "control connection refused: at the limit");
                    tasks.spawn(refuse_busy(stream, limits.max_connections));
                    continue;
                };
                let handler = handler.clone();
                let mut stop = stop_rx.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let stopped = async move {
                        // An error means the server is gone: stop as well.
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    };
                    if let Err(e) = serve_connection(stream, handler.as_ref(), limits, stopped).await {
                        match e.kind() {
                            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                                tracing::debug!(error = %e, "control client went away");
                            }
                            _ => tracing::warn!(error = %e, "control connection failed"),
                        }
                    }
                });
            }
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => log_join(finished),
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    if !tasks.is_empty() {
        tracing::info!(
            connections = tasks.len(),
            "control socket closing; waiting for requests in progress"
        );
    }
    while let Some(finished) = tasks.join_next().await {
        log_join(finished);
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, socket = %path.display(), "cannot remove the control socket"),
    }
    tracing::info!(socket = %path.display(), "control socket closed");
    Ok(())
}

fn log_join(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        tracing::error!(error = %e, "a control connection task failed");
    }
}

/// Binds `path`, replacing a stale socket file, and sets its mode.
async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!(
                "{} exists and is not a socket; refusing to replace it with the control socket",
                path.display()
            )
        }
        Ok(_) => match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Ok(_)) => bail!(
                "another process (an agent already running?) listens on the control socket {}; stop it or choose another --control path",
                path.display()
            ),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Nobody listens: a socket left by an agent that did not
                // shut down cleanly.
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot remove the stale control socket {}", path.display()))
                    }
                }
                tracing::info!(socket = %path.display(), "replaced a stale control socket");
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(e)) => {
                return Err(e).with_context(|| format!("cannot tell whether the control socket {} is in use", path.display()))
            }
            Err(_) => bail!(
                "the control socket {} accepts connections but does not answer within {PROBE_TIMEOUT:?}; a stuck agent may hold it",
                path.display()
            ),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    // Right after bind: no connection is accepted before the mode is set.
    if let Err(e) = fs::set_permissions(path, Permissions::from_mode(SOCKET_MODE)) {
        let _ = fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot set the mode of the control socket {}", path.display()));
    }
    Ok(listener)
}

async fn refuse_busy(mut stream: UnixStream, limit: usize) {
    let line = Response::new(
        Value::Null,
        Err(RpcError::new(
            UNAVAILABLE,
            format!("the agent already serves {limit} control connections, its limit; try again later"),
        )),
    )
    .to_line();
    // A client that does not read must not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line.as_bytes())).await;
}

/// What reading one line gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads up to the next `\n` (not included) into `buf`, never holding more
/// than `max` bytes. A last line without `\n` counts as a line.
pub(super) async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() { LineRead::Eof } else { LineRead::Line });
        }
        let (take, found) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(if found { take + 1 } else { take });
        if found {
            return Ok(LineRead::Line);
        }
    }
}

/// Serves one connection: reads request lines and writes one response line
/// for each (none for notifications), until the client closes, stays idle
/// past the limit, sends an oversized line, or `stop` completes while no
/// request is being handled.
pub async fn serve_connection<S: AsyncRead + AsyncWrite>(
    stream: S,
    handler: &dyn ControlHandler,
    limits: ServeLimits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    tokio::pin!(stop);
    loop {
        line.clear();
        // Only waiting for a request is interrupted; a request being
        // handled runs to its end even if the client leaves, so that an
        // install is never cut half-way.
        let read = tokio::select! {
            read = read_line_limited(&mut reader, &mut line, limits.max_line_bytes) => read?,
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(limits.idle_timeout) => {
                tracing::debug!(idle = ?limits.idle_timeout, "closing an idle control connection");
                return Ok(());
            }
        };
        match read {
            LineRead::Eof => return Ok(()),
            LineRead::TooLong => {
                let error = RpcError::new(
                    INVALID_REQUEST,
                    format!(
                        "invalid request: the request line is longer than {} bytes, the limit; the connection is closed",
                        limits.max_line_bytes
                    ),
                );
                tracing::warn!(limit = limits.max_line_bytes, "control request line too long");
                write
                    .write_all(Response::new(Value::Null, Err(error)).to_line().as_bytes())
                    .await?;
                write.flush().await?;
                return Ok(());
            }
            LineRead::Line => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(response) = respond(handler, &line).await {
            write.write_all(response.to_line().as_bytes()).await?;
            write.flush().await?;
        }
    }
}

/// The response to one request line; `None` for a notification (a request
/// without an id), which JSON-RPC answers with nothing.
pub async fn respond(handler: &dyn ControlHandler, line: &[u8]) -> Option<Response> {
    let request = match Request::parse(line) {
        Ok(request) => request,
        Err(refusal) => {
            tracing::info!(code = refusal.error.code, error = %refusal.error, "control request refused");
            return Some(Response::new(refusal.id, Err(refusal.error)));
        }
    };
    let started = Instant::now();
    let outcome = match Call::parse(&request.method, request.params) {
        Ok(call) => handler.handle(call).await,
        Err(e) => Err(e),
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // The method name only: params may hold a password.
    match &outcome {
        Ok(_) => tracing::debug!(method = %request.method, elapsed_ms, "control request done"),
        Err(e) => {
            tracing::info!(method = %request.method, code = e.code, error = %e, elapsed_ms, "control request failed")
        }
    }
    let id = request.id?;
    Some(Response::new(id, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{METHOD_NOT_FOUND, PARSE_ERROR};
    use async_trait::async_trait;
    use serde_json::json;

    /// Answers every call with its method name, and `container-start` of
    /// app "slow" only after a pause.
    struct Echo;

    #[async_trait]
    impl ControlHandler for Echo {
        async fn handle(&self, call: Call) -> Result<Value, RpcError> {
            if call == (Call::Start { app: "slow".into() }) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(json!({ "method": call.method() }))
        }
    }

    fn limits() -> ServeLimits {
        ServeLimits {
            max_line_bytes: 256,
            max_connections: 2,
            idle_timeout: Duration::from_secs(10),
        }
    }

    /// Sends `input` over an in-memory connection and returns every
    /// response line the server writes before it closes.
    async fn exchange(input: &[u8]) -> Vec<Value> {
        let (client, server) = tokio::io::duplex(4096);
        let serving =
            tokio::spawn(async move { serve_connection(server, &Echo, limits(), std::future::pending()).await });
        let (read, mut write) = tokio::io::split(client);
        write.write_all(input).await.expect("write");
        write.shutdown().await.expect("half-close");
        let mut lines = BufReader::new(read).lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read") {
            out.push(serde_json::from_str(&line).expect("each response line is JSON"));
        }
        serving.await.expect("joined").expect("served");
        out
    }

    #[tokio::test]
    async fn several_requests_on_one_connection_get_one_answer_each_in_order() {
        let out = exchange(
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"container-list\"}\n\
              \n\
              {\"jsonrpc\":\"2.0\",\"id\":\"two\",\"method\":\"registry.list\"}\r\n",
        )
        .await;
        assert_eq!(
            out,
            [
                json!({"jsonrpc": "2.0", "id": 1, "result": {"method": "container-list"}}),
                json!({"jsonrpc": "2.0", "id": "two", "result": {"method": "registry.list"}}),
            ]
        );
    }

    #[tokio::test]
    async fn a_malformed_line_is_answered_and_the_connection_keeps_serving() {
        let out = exchange(b"{not json\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"nope\"}\n{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"container-list\"}\n").await;
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0]["error"]["code"], json!(PARSE_ERROR));
        assert_eq!(out[0]["id"], Value::Null);
        assert_eq!(out[1]["error"]["code"], json!(METHOD_NOT_FOUND));
        assert_eq!(out[1]["id"], json!(2));
        assert_eq!(out[2]["result"]["method"], json!("container-list"));
    }

    #[tokio::test]
    async fn a_notification_runs_but_gets_no_answer() {
        let out = exchange(
            b"{\"jsonrpc\":\"2.0\",\"method\":\"container-list\"}\n{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"registry.list\"}\n",
        )
        .await;
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["id"], json!(9));
    }

    #[tokio::test]
    async fn an_oversized_line_is_refused_and_the_connection_closed() {
        let mut input = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"container-status\",\"params\":{{\"app\":\"{}\"}}}}\n",
            "x".repeat(300)
        )
        .into_bytes();
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"container-list\"}\n");
        let out = exchange(&input).await;
        assert_eq!(out.len(), 1, "nothing after the oversized line is served: {out:?}");
        assert_eq!(out[0]["error"]["code"], json!(INVALID_REQUEST));
        let message = out[0]["error"]["message"].as_str().expect("message");
        assert!(message.contains("longer than 256 bytes"), "{message}");
    }

    #[tokio::test]
    async fn a_line_at_the_limit_is_read_whole_across_buffer_refills() {
        let mut reader = BufReader::with_capacity(7, &b"0123456789abcdef\nrest"[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_limited(&mut reader, &mut buf, 16).await.expect("read"),
            LineRead::Line
        );
        assert_eq!(buf, b"0123456789abcdef");
        buf.clear();
        assert_eq!(
            read_line_limited(&mut reader, &mut buf, 16).await.expect("read"),
            LineRead::Line
        );
        assert_eq!(buf, b"rest");
        buf.clear();
        assert_eq!(
            read_line_limited(&mut reader, &mut buf, 16).await.expect("read"),
            LineRead::Eof
        );
        let mut reader = BufReader::with_capacity(7, &b"0123456789abcdefg\n"[..]);
        assert_eq!(
            read_line_limited(&mut reader, &mut Vec::new(), 16).await.expect("read"),
            LineRead::TooLong
        );
    }

    #[tokio::test]
    async fn stop_waits_for_the_request_in_progress_then_closes() {
        let (client, server) = tokio::io::duplex(4096);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let serving = tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            serve_connection(server, &Echo, limits(), stop).await
        });
        let (read, mut write) = tokio::io::split(client);
        write
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"container-start\",\"params\":{\"app\":\"slow\"}}\n")
            .await
            .expect("write");
        // Let the server pick the request up, then ask it to stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(true).expect("stop");
        let mut lines = BufReader::new(read).lines();
        let answer = lines
            .next_line()
            .await
            .expect("read")
            .expect("the slow request is answered");
        assert!(answer.contains("container-start"), "{answer}");
        assert_eq!(
            lines.next_line().await.expect("read"),
            None,
            "then the connection closes"
        );
        serving.await.expect("joined").expect("served");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (client, server) = tokio::io::duplex(4096);
        let quick = ServeLimits {
            idle_timeout: Duration::from_millis(50),
            ..limits()
        };
        let serving = tokio::spawn(async move { serve_connection(server, &Echo, quick, std::future::pending()).await });
        let mut lines = BufReader::new(client).lines();
        let closed = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        assert!(matches!(closed, Ok(Ok(None))), "{closed:?}");
        serving.await.expect("joined").expect("served");
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let path = path.clone();
            tokio::spawn(async move {
                serve_with(&path, Arc::new(Echo), limits(), async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        let connect = || async {
            for _ in 0..100 {
                if let Ok(s) = UnixStream::connect(&path).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the server never listened");
        };
        let _first = connect().await;
        let _second = connect().await;
        let third = connect().await;
        let mut lines = BufReader::new(third).lines();
        let line = lines.next_line().await.expect("read").expect("an error line");
        let value: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["error"]["code"], json!(UNAVAILABLE));
        assert!(line.contains("limit"), "{line}");
        drop((_first, _second));
        stop_tx.send(()).expect("stop");
        server.await.expect("joined").expect("served");
        assert!(!path.exists(), "the socket file is removed on shutdown");
    }
}
