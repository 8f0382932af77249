//! `os update URL`: the bundle downloaded before the helper gets it.
//!
//! HTTPS only (rustls with the system's roots, the reqwest the agent
//! already uses for registries), except `http://` to a loopback address,
//! for tests. Downloaded by the agent's user into
//! `DataRoot::os_download()`, then passed to the helper as an open file.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Why a URL is not fetched.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{url}: {why}; allowed: an https:// URL, or http:// to a loopback address (tests)")]
pub struct UrlRefused {
    pub url: String,
    pub why: String,
}

/// Checks `url`: https, or http to 127.0.0.0/8, ::1 or localhost.
pub fn check_url(url: &str) -> Result<reqwest::Url, UrlRefused> {
    let refuse = |why: String| UrlRefused {
        url: url.to_owned(),
        why,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| refuse(format!("not a URL: {e}")))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refuse("a URL with a login is not accepted".into()));
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
            if loopback {
                Ok(parsed)
            } else {
                Err(refuse("plain http is allowed only to a loopback address".into()))
            }
        }
        other => Err(refuse(format!("the scheme {other:?} is not fetched"))),
    }
}

/// Downloads `url` into `to` (0600, replaced), calling `progress` every
/// few seconds. Returns the size.
pub fn download(url: &str, to: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<u64> {
    let url = check_url(url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the download's runtime")?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .build()
            .context("cannot make an HTTPS client")?;
        let mut resp = client
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("cannot fetch {url}"))?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        let total = resp.content_length();
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(to);
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(to)
                .with_context(|| format!("cannot create {}", to.display()))?
        };
        let (mut done, mut said) = (0u64, Instant::now());
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("the download of {url} broke"))?
        {
            file.write_all(&chunk)
                .with_context(|| format!("cannot write {}", to.display()))?;
            done += chunk.len() as u64;
            if said.elapsed() >= Duration::from_secs(2) {
                said = Instant::now();
                progress(&match total {
                    Some(t) if t > 0 => format!("downloading: {} of {} MiB ({}%)", done >> 20, t >> 20, done * 100 / t),
                    _ => format!("downloading: {} MiB", done >> 20),
                });
            }
        }
        file.sync_all()
            .with_context(|| format!("cannot sync {}", to.display()))?;
        if let Some(t) = total {
            if t != done {
                bail!("{url}: got {done} bytes of the {t} announced");
            }
        }
        progress(&format!("downloaded {} MiB from {url}", done >> 20));
        Ok(done)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn https_or_loopback_http_only() {
        for ok in [
            "https://example.org/a.raucb",
            "http://127.0.0.1:8080/a.raucb",
            "http://[::1]/a",
            "http://localhost/a",
        ] {
            check_url(ok).unwrap();
        }
        for (bad, says) in [
            ("http://example.org/a", "only to a loopback"),
            ("ftp://x/a", "scheme \"ftp\""),
            ("https://u:p@example.org/a", "login"),
            ("/tmp/a", "not a URL"),
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("allowed: an https://"), "{e}");
        }
    }

    #[test]
    fn a_loopback_download_lands_whole() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = vec![7u8; 300_000];
        let served = body.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).unwrap();
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                served.len()
            )
            .unwrap();
            s.write_all(&served).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("b.raucb");
        let n = download(&format!("http://127.0.0.1:{port}/b.raucb"), &to, &mut |_| {}).unwrap();
        assert_eq!(n, 300_000);
        assert_eq!(std::fs::read(&to).unwrap(), body);
    }
}
