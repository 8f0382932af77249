//! A registry that speaks just enough of the distribution API, with Docker
//! Hub's token flow, for unit tests: `GET /v2/` answers 401 with
//! `WWW-Authenticate: Bearer realm=…,service=…`, the realm hands out a token
//! (only for a basic login, when one is required), and manifests and blobs
//! are served only with that token. These machines cannot reach Docker Hub,
//! so this is how its flow is tested.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use archy_agent::manifest::Digest;

const TOKEN: &str = "fake-hub-token";
pub const SERVICE: &str = "fake-hub";

#[derive(Debug, Default)]
struct State {
    /// Manifests by digest: media type and bytes.
    manifests: HashMap<String, (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
    /// `Basic <base64>` the token endpoint insists on, when set.
    login: Option<String>,
    /// Every request line and its Authorization header, in order.
    log: Vec<String>,
}

#[derive(Clone)]
pub struct FakeRegistry {
    pub host: String,
    state: Arc<Mutex<State>>,
}

impl FakeRegistry {
    pub fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let registry = FakeRegistry {
            host: host.clone(),
            state: Arc::default(),
        };
        let state = Arc::clone(&registry.state);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&state);
                let host = host.clone();
                thread::spawn(move || serve(stream, &state, &host));
            }
        });
        registry
    }

    pub fn require_login(&self, user: &str, password: &str) {
        self.lock().login = Some(format!("Basic {}", base64(format!("{user}:{password}").as_bytes())));
    }

    pub fn add_manifest(&self, media_type: &str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        self.lock()
            .manifests
            .insert(digest.to_string(), (media_type.to_owned(), bytes));
        digest
    }

    pub fn add_blob(&self, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        self.lock().blobs.insert(digest.to_string(), bytes);
        digest
    }

    /// Serves `bytes` under `digest`, whatever they hash to.
    pub fn replace_blob(&self, digest: &Digest, bytes: Vec<u8>) {
        self.lock().blobs.insert(digest.to_string(), bytes);
    }

    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, host: &str) {
    let Ok(clone) = stream.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut authorization = String::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = value.trim().to_owned();
            }
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut state = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    state.log.push(format!("{path} [{authorization}]"));
    let bearer = authorization == format!("Bearer {TOKEN}");
    let challenge = format!("WWW-Authenticate: Bearer realm=\"http://{host}/token\",service=\"{SERVICE}\"");
    let (status, headers, body) = if path == "/v2/" {
        if bearer {
            ("200 OK", String::new(), b"{}".to_vec())
        } else {
            ("401 Unauthorized", challenge, b"{}".to_vec())
        }
    } else if path.starts_with("/token?") {
        match &state.login {
            Some(login) if *login != authorization => ("401 Unauthorized", String::new(), b"{}".to_vec()),
            _ => (
                "200 OK",
                "Content-Type: application/json".to_owned(),
                format!("{{\"token\":\"{TOKEN}\",\"expires_in\":300}}").into_bytes(),
            ),
        }
    } else if !bearer {
        ("401 Unauthorized", challenge, b"{}".to_vec())
    } else if let Some((_, digest)) = path.split_once("/manifests/") {
        match state.manifests.get(digest) {
            Some((media_type, bytes)) => (
                "200 OK",
                format!("Content-Type: {media_type}\r\nDocker-Content-Digest: {digest}"),
                bytes.clone(),
            ),
            None => ("404 Not Found", String::new(), b"{}".to_vec()),
        }
    } else if let Some((_, digest)) = path.split_once("/blobs/") {
        match state.blobs.get(digest) {
            Some(bytes) => (
                "200 OK",
                format!("Content-Type: application/octet-stream\r\nDocker-Content-Digest: {digest}"),
                bytes.clone(),
            ),
            None => ("404 Not Found", String::new(), b"{}".to_vec()),
        }
    } else {
        ("404 Not Found", String::new(), b"{}".to_vec())
    };
    drop(state);
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !headers.is_empty() {
        head.push_str(&headers);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_rfc_examples() {
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(b"fooba"), "Zm9vYmE=");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
    assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
}
