//! `registry test`: can this node reach a registry, and do its credentials
//! work?
//!
//! One `GET <url>/v2/` answers both, as the registry API defines it: 200
//! means access, 401 names the auth scheme in `WWW-Authenticate`. For Basic
//! the request is repeated with the stored login; for Bearer (Docker Hub,
//! ghcr.io) a token is fetched from the named realm with the login, the way
//! a pull does it, and the request repeated with the token.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{redirect, Client, StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::url::is_loopback;
use super::{Credentials, Registry};

/// How long one request may take, connect included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 5;

/// What the registry said about access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthOutcome {
    /// Access works: with the stored credentials, or anonymously.
    Ok,
    /// The registry wants a login and none is stored.
    Required,
    /// The registry refused the stored login.
    Refused,
    /// Something else: an unexpected status, a broken token service.
    Error,
}

impl AuthOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Required => "required",
            AuthOutcome::Refused => "refused",
            AuthOutcome::Error => "error",
        }
    }
}

/// The outcome of probing one registry. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub name: String,
    pub url: String,
    /// Whether the registry answered HTTP at all.
    pub reachable: bool,
    /// Status of the last `GET /v2/` (after authenticating, when it did).
    pub status: Option<u16>,
    /// `None` when unreachable.
    pub auth: Option<AuthOutcome>,
    /// Time to the first `/v2/` answer: connect, TLS and one round trip.
    pub latency_ms: Option<u64>,
    /// Why it is unreachable or why auth is `error` or `refused`.
    pub error: Option<String>,
}

impl ProbeReport {
    /// Usable for pulls as configured: reachable, and access is not refused
    /// or broken. `required` passes: a public image may still be pulled.
    pub fn is_ok(&self) -> bool {
        self.reachable && matches!(self.auth, Some(AuthOutcome::Ok | AuthOutcome::Required))
    }
}

/// The HTTP client could not be set up (the TLS roots, typically).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client for registry probes")]
pub struct ProbeSetupError(#[source] reqwest::Error);

/// Probes registries; one client is shared so connections are reused.
#[derive(Debug, Clone)]
pub struct Prober {
    client: Client,
    timeout: Duration,
}

impl Prober {
    pub fn new() -> Result<Prober, ProbeSetupError> {
        Prober::with_timeout(PROBE_TIMEOUT)
    }

    /// A prober whose every request gives up after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Result<Prober, ProbeSetupError> {
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("archy-agent/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect::Policy::custom(|attempt| {
                // A redirect must not downgrade to plain HTTP off loopback:
                // the request may carry a login or a token.
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if allowed_url(attempt.url()) {
                    attempt.follow()
                } else {
                    attempt.error("redirect to plain http off loopback refused")
                }
            }))
            .build()
            .map_err(ProbeSetupError)?;
        Ok(Prober { client, timeout })
    }

    /// Probes every registry at once; reports come back in the given order.
    pub async fn probe_all(&self, registries: &[Registry]) -> Vec<ProbeReport> {
        join_all(registries.iter().map(|r| self.probe(r))).await
    }

    /// Probes one registry. Never fails: a registry that cannot be reached
    /// is a report that says so.
    pub async fn probe(&self, registry: &Registry) -> ProbeReport {
        let mut report = ProbeReport {
            name: registry.name.clone(),
            url: registry.url.to_string(),
            reachable: false,
            status: None,
            auth: None,
            latency_ms: None,
            error: None,
        };
        let v2 = format!("{}/v2/", registry.url.api_base());
        let started = Instant::now();
        let first = match self.client.get(&v2).send().await {
            Ok(resp) => resp,
            Err(e) => {
                report.error = Some(self.describe(&e));
                return report;
            }
        };
        report.latency_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        report.reachable = true;
        report.status = Some(first.status().as_u16());
        let step = match first.status() {
            StatusCode::OK => Step::done(AuthOutcome::Ok),
            StatusCode::UNAUTHORIZED => {
                let challenge = first
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(Challenge::parse)
                    .find(|c| !matches!(c, Challenge::Other))
                    .unwrap_or(Challenge::Other);
                self.authenticate(&v2, challenge, registry.credentials.as_ref()).await
            }
            other => Step::error(None, format!("unexpected HTTP status {other} from {v2}")),
        };
        if let Some(status) = step.status {
            report.status = Some(status);
        }
        report.auth = Some(step.outcome);
        report.error = step.error;
        report
    }

    /// After a 401: log in the way the registry asked and try again.
    async fn authenticate(&self, v2: &str, challenge: Challenge, creds: Option<&Credentials>) -> Step {
        match challenge {
            Challenge::Bearer { realm, service, scope } => {
                let token = match self
                    .fetch_token(&realm, service.as_deref(), scope.as_deref(), creds)
                    .await
                {
                    Ok(Token::Issued(token)) => token,
                    Ok(Token::Denied(status)) => {
                        return match creds {
                            Some(_) => Step::refused(None, format!("the token service refused the login ({status})")),
                            None => Step::done(AuthOutcome::Required),
                        }
                    }
                    Err(problem) => return Step::error(None, problem),
                };
                match self.client.get(v2).bearer_auth(token).send().await {
                    Ok(resp) => self.after_login(resp.status(), creds.is_some(), "with the token"),
                    Err(e) => Step::error(None, self.describe(&e)),
                }
            }
            Challenge::Basic | Challenge::Other => {
                let Some(creds) = creds else {
                    return Step::done(AuthOutcome::Required);
                };
                let request = self.client.get(v2).basic_auth(creds.username(), Some(creds.password()));
                match request.send().await {
                    Ok(resp) => self.after_login(resp.status(), true, "with the login"),
                    Err(e) => Step::error(None, self.describe(&e)),
                }
            }
        }
    }

    fn after_login(&self, status: StatusCode, with_creds: bool, how: &str) -> Step {
        let code = Some(status.as_u16());
        match status {
            StatusCode::OK => Step {
                outcome: AuthOutcome::Ok,
                status: code,
                error: None,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if with_creds => {
                Step::refused(code, format!("the registry refused the login ({status})"))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Step {
                outcome: AuthOutcome::Required,
                status: code,
                error: None,
            },
            other => Step::error(code, format!("unexpected HTTP status {other} {how}")),
        }
    }

    /// Asks the realm for a token, with the login when there is one (an
    /// anonymous token is enough for public images on Docker Hub).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        creds: Option<&Credentials>,
    ) -> Result<Token, String> {
        let mut url = Url::parse(realm).map_err(|e| format!("the token realm `{realm}` is not a url: {e}"))?;
        if !allowed_url(&url) {
            return Err(format!(
                "the token realm `{realm}` is plain http off loopback; no login is sent there"
            ));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            if let Some(scope) = scope {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.client.get(url);
        if let Some(c) = creds {
            request = request.basic_auth(c.username(), Some(c.password()));
        }
        let resp = request.send().await.map_err(|e| self.describe(&e))?;
        let status = resp.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Ok(Token::Denied(status));
        }
        if status != StatusCode::OK {
            return Err(format!("the token service at {realm} answered HTTP {status}"));
        }
        let body = resp.bytes().await.map_err(|e| self.describe(&e))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("the token service at {realm} sent an unreadable answer: {e}"))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .map(Token::Issued)
            .ok_or_else(|| format!("the token service at {realm} sent no token"))
    }

    /// The error and its causes on one line; a timeout says so plainly.
    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {}", humantime::format_duration(self.timeout));
        }
        crate::error_chain(e)
    }
}

/// The result of one auth step.
struct Step {
    outcome: AuthOutcome,
    /// The status of the repeated `/v2/` request, when one was made.
    status: Option<u16>,
    error: Option<String>,
}

impl Step {
    fn done(outcome: AuthOutcome) -> Step {
        Step {
            outcome,
            status: None,
            error: None,
        }
    }

    fn refused(status: Option<u16>, why: String) -> Step {
        Step {
            outcome: AuthOutcome::Refused,
            status,
            error: Some(why),
        }
    }

    fn error(status: Option<u16>, why: String) -> Step {
        Step {
            outcome: AuthOutcome::Error,
            status,
            error: Some(why),
        }
    }
}

enum Token {
    Issued(String),
    Denied(StatusCode),
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

/// HTTPS anywhere, plain HTTP only on loopback: the rule for registry URLs,
/// applied to redirects and token realms too.
fn allowed_url(url: &Url) -> bool {
    // `host_str` gives IPv6 in brackets, the form `is_loopback` takes.
    match (url.scheme(), url.host_str()) {
        ("https", Some(_)) => true,
        ("http", Some(host)) => is_loopback(host),
        _ => false,
    }
}

/// One `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Other,
}

impl Challenge {
    /// Parses `Scheme key="value", key=value`. A Bearer challenge without
    /// a realm cannot be followed and counts as `Other`.
    fn parse(header: &str) -> Challenge {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Challenge::Basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Challenge::Other;
        }
        let params = auth_params(params);
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        match get("realm") {
            Some(realm) => Challenge::Bearer {
                realm,
                service: get("service"),
                scope: get("scope"),
            },
            None => Challenge::Other,
        }
    }
}

/// `key="value", key=value` into pairs; quoted values may hold commas and
/// backslash escapes.
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            return out;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
            value = value.trim_end().to_owned();
        }
        out.push((key.trim().to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn challenges_are_parsed() {
        assert_eq!(Challenge::parse("Basic realm=\"Registry Realm\""), Challenge::Basic);
        assert_eq!(
            Challenge::parse(
                "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:a/b:pull,push\""
            ),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            Challenge::parse("bearer Realm=https://t.example/token , service=x"),
            Challenge::Bearer {
                realm: "https://t.example/token".into(),
                service: Some("x".into()),
                scope: None,
            }
        );
        assert_eq!(Challenge::parse("Bearer service=\"x\""), Challenge::Other);
        assert_eq!(Challenge::parse("Negotiate"), Challenge::Other);
    }

    #[test]
    fn only_https_or_loopback_http_may_receive_a_login() {
        let ok = |s: &str| allowed_url(&Url::parse(s).expect("url"));
        assert!(ok("https://auth.docker.io/token"));
        assert!(ok("http://127.0.0.1:5000/token"));
        assert!(ok("http://localhost/token"));
        assert!(ok("http://[::1]:80/token"));
        assert!(!ok("http://10.0.0.1/token"));
        assert!(!ok("http://auth.example/token"));
        assert!(!ok("ftp://127.0.0.1/token"));
    }

    /// A fake token-auth registry on loopback, enough to walk the Bearer
    /// flow: `/v2/` wants `Bearer good`, `/token` gives `good` for the right
    /// login, an anonymous token that `/v2/` refuses for none, and 401 for a
    /// wrong one.
    async fn token_registry() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let realm = Arc::new(format!("http://{addr}/token"));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let realm = Arc::clone(&realm);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    let path = req.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let auth = req
                        .lines()
                        .find_map(|l| l.strip_prefix("authorization: "))
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    let (status, headers, body) = if path == "/v2/" {
                        if auth == "bearer good" {
                            ("200 OK", String::new(), "{}".to_owned())
                        } else {
                            let h = format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\"\r\n");
                            ("401 Unauthorized", h, "{}".to_owned())
                        }
                    } else if path.starts_with("/token?") && path.contains("service=fake") {
                        // "me:pw" in base64, lowercased with the request.
                        match auth.as_str() {
                            "basic bwu6chc=" => ("200 OK", String::new(), "{\"token\":\"good\"}".to_owned()),
                            "" => ("200 OK", String::new(), "{\"access_token\":\"anon\"}".to_owned()),
                            _ => ("401 Unauthorized", String::new(), "{}".to_owned()),
                        }
                    } else {
                        ("404 Not Found", String::new(), "{}".to_owned())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn registry(url: &str, creds: Option<(&str, &str)>) -> Registry {
        let r = Registry::new("fake", url.parse().expect("url"), 1).expect("name");
        match creds {
            Some((u, p)) => r.with_credentials(Credentials::new(u, p).expect("creds")),
            None => r,
        }
    }

    #[tokio::test]
    async fn bearer_login_fetches_a_token_and_is_ok() {
        let url = token_registry().await;
        let report = Prober::new()
            .expect("client")
            .probe(&registry(&url, Some(("me", "pw"))))
            .await;
        assert_eq!(report.auth, Some(AuthOutcome::Ok), "{report:?}");
        assert_eq!(report.status, Some(200));
        assert!(report.reachable && report.latency_ms.is_some() && report.is_ok());
    }

    #[tokio::test]
    async fn bearer_with_a_wrong_login_is_refused() {
        let url = token_registry().await;
        let report = Prober::new()
            .expect("client")
            .probe(&registry(&url, Some(("me", "nope"))))
            .await;
        assert_eq!(report.auth, Some(AuthOutcome::Refused), "{report:?}");
        assert!(!report.is_ok());
        assert!(!format!("{report:?}").contains("nope"));
    }

    #[tokio::test]
    async fn bearer_without_a_login_is_required_when_the_anonymous_token_is_not_enough() {
        let url = token_registry().await;
        let report = Prober::new().expect("client").probe(&registry(&url, None)).await;
        assert_eq!(report.auth, Some(AuthOutcome::Required), "{report:?}");
        assert_eq!(report.status, Some(401));
        assert!(report.is_ok());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_with_the_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let report = Prober::new()
            .expect("client")
            .probe(&registry(&format!("http://{addr}"), None))
            .await;
        assert!(!report.reachable, "{report:?}");
        assert_eq!((report.auth, report.status, report.latency_ms), (None, None, None));
        let error = report.error.unwrap_or_default();
        assert!(error.to_lowercase().contains("connect"), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let prober = Prober::with_timeout(Duration::from_millis(300)).expect("client");
        let started = Instant::now();
        let report = prober.probe(&registry(&format!("http://{addr}"), None)).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(!report.reachable);
        assert_eq!(report.error.as_deref(), Some("no answer within 300ms"));
        drop(listener);
    }

    #[tokio::test]
    async fn a_server_that_is_not_a_registry_is_an_auth_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut chunk = [0u8; 1024];
                let _ = conn.read(&mut chunk).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        let report = Prober::new()
            .expect("client")
            .probe(&registry(&format!("http://{addr}"), None))
            .await;
        assert!(report.reachable);
        assert_eq!((report.auth, report.status), (Some(AuthOutcome::Error), Some(404)));
        assert!(!report.is_ok());
    }
}
