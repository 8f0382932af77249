//! Registry addresses: `https://host[:port]`, or `http://` on loopback.
//!
//! A registry URL names a server, nothing else: no path (registries answer
//! under `/v2/`), no query, and no `user:password@`, because credentials
//! have their own place in the store and must never travel in a string
//! that gets printed.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a registry URL may look like, for error messages.
pub const URL_RULE: &str =
    "allowed: `https://host[:port]`, or `http://host[:port]` for loopback hosts only (127.0.0.0/8, [::1], localhost)";

/// Docker Hub's reference name and the host that actually serves its API.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Why a string is not a registry URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry url `{url}` is not allowed: {problem}; {URL_RULE}")]
pub struct UrlError {
    /// The string as given, with anything that may be a login replaced by
    /// [`HIDDEN`] (see [`redact_userinfo`]): this is printed and logged.
    pub url: String,
    pub problem: &'static str,
}

/// What stands in for a login cut out of a URL.
pub const HIDDEN: &str = "<hidden>";

/// `s` with everything that may be a `user:password@` replaced by
/// [`HIDDEN`]: all that comes before the last `@`, except a plain
/// `scheme://` in front. A string without `@` comes back unchanged.
/// Cutting too much is harmless, printing a password is not: an `@` in a
/// path hides the path as well, and a password holding `/`, `@` or `://`
/// is hidden whole.
pub fn redact_userinfo(s: &str) -> String {
    let Some(at) = s.rfind('@') else {
        return s.to_owned();
    };
    let scheme = s[..at].split_once("://").map(|(scheme, _)| scheme).filter(|scheme| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    match scheme {
        Some(scheme) => format!("{scheme}://{HIDDEN}{}", &s[at..]),
        None => format!("{HIDDEN}{}", &s[at..]),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            Scheme::Http => 80,
        }
    }
}

/// A validated registry address. Hosts are kept in lowercase and a port
/// equal to the scheme's default is dropped, so two spellings of one server
/// compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegistryUrl {
    scheme: Scheme,
    /// Lowercase host name or IPv4 address, or an IPv6 address in brackets.
    host: String,
    /// `None` when it is the scheme's default.
    port: Option<u16>,
}

impl RegistryUrl {
    /// `host[:port]` as written in an image reference (`mirror.lan:5000`,
    /// `ghcr.io`): the port is left out when it is the scheme's default.
    pub fn host_port(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }

    /// Plain HTTP: allowed on loopback only, and the engine must be told
    /// to skip TLS for it.
    pub fn is_insecure(&self) -> bool {
        self.scheme == Scheme::Http
    }

    /// The base the registry API answers under (`<base>/v2/`). Docker Hub is
    /// named `docker.io` in image references but served from
    /// `registry-1.docker.io`, the same mapping Docker and Podman make.
    pub fn api_base(&self) -> String {
        let host = if self.host == DOCKER_HUB && self.port.is_none() {
            DOCKER_HUB_API
        } else {
            &self.host_port()
        };
        format!("{}://{host}", self.scheme.as_str())
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host_port())
    }
}

impl FromStr for RegistryUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |problem| UrlError {
            url: redact_userinfo(s),
            problem,
        };
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some(_) => return Err(err("the scheme must be https or http")),
            None => return Err(err("it has no scheme")),
        };
        // One trailing slash is the empty path people paste with a URL.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(err(
                "credentials in the url are refused, use --username and --password-stdin",
            ));
        }
        if authority.contains(['/', '?', '#']) {
            return Err(err("it has a path, query or fragment; give the server only"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| err("the host or port is malformed"))?;
        if scheme == Scheme::Http && !is_loopback(&host) {
            return Err(err("plain http is refused for a host that is not loopback"));
        }
        Ok(RegistryUrl {
            scheme,
            port: port.filter(|&p| p != scheme.default_port()),
            host,
        })
    }
}

impl TryFrom<String> for RegistryUrl {
    type Error = UrlError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RegistryUrl> for String {
    fn from(u: RegistryUrl) -> String {
        u.to_string()
    }
}

/// Splits `host[:port]` and checks both; the host comes back in lowercase
/// (bracketed for IPv6).
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        addr.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", addr.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if !valid_host_name(host) {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|&p| p != 0)?)
        }
        Some(_) => return None,
    };
    Some((host, port))
}

/// A DNS name or dotted IPv4 address: labels of letters, digits and `-`,
/// not starting or ending with `-`.
fn valid_host_name(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `host` (as kept in [`RegistryUrl`]) is a loopback address.
/// Only addresses and `localhost` count: any other name could resolve
/// anywhere.
pub fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> RegistryUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn problem(s: &str) -> &'static str {
        s.parse::<RegistryUrl>().expect_err(s).problem
    }

    #[test]
    fn https_with_and_without_port_is_accepted() {
        assert_eq!(url("https://mirror.lan:5000").host_port(), "mirror.lan:5000");
        assert_eq!(url("https://ghcr.io").host_port(), "ghcr.io");
        assert!(!url("https://ghcr.io").is_insecure());
    }

    #[test]
    fn http_on_loopback_is_accepted_and_marked_insecure() {
        for s in [
            "http://127.0.0.1:5000",
            "http://127.3.2.1",
            "http://localhost:5000",
            "http://[::1]:5000",
        ] {
            assert!(url(s).is_insecure(), "{s}");
        }
        assert_eq!(url("http://[::1]:5000").host_port(), "[::1]:5000");
    }

    #[test]
    fn http_off_loopback_is_refused() {
        for s in [
            "http://10.0.0.1:5000",
            "http://mirror.lan",
            "http://[::2]:80",
            "http://localhost.evil.com",
        ] {
            assert_eq!(
                problem(s),
                "plain http is refused for a host that is not loopback",
                "{s}"
            );
        }
    }

    #[test]
    fn refusal_names_the_url_and_what_is_allowed() {
        let e = "http://10.0.0.1:5000".parse::<RegistryUrl>().expect_err("not loopback");
        let msg = e.to_string();
        assert!(msg.contains("http://10.0.0.1:5000"), "{msg}");
        assert!(msg.contains("https://host[:port]"), "{msg}");
        assert!(msg.contains("loopback"), "{msg}");
    }

    #[test]
    fn path_query_and_fragment_are_refused() {
        for s in [
            "https://mirror.lan/v2",
            "https://mirror.lan/a/",
            "https://mirror.lan?x=1",
            "https://m.lan#f",
        ] {
            assert_eq!(
                problem(s),
                "it has a path, query or fragment; give the server only",
                "{s}"
            );
        }
    }

    #[test]
    fn userinfo_is_refused() {
        for s in ["https://user:pass@mirror.lan", "https://user@mirror.lan:5000"] {
            assert!(problem(s).starts_with("credentials in the url are refused"), "{s}");
        }
    }

    #[test]
    fn a_refusal_never_shows_the_password_whatever_the_reason() {
        const SECRET: &str = "s3cr3t-pw";
        for s in [
            "https://me:s3cr3t-pw@mirror.lan:5000",
            "HTTPS://me:s3cr3t-pw@mirror.lan/",
            "http://me:s3cr3t-pw@10.0.0.1",
            "ftp://me:s3cr3t-pw@mirror.lan",
            "me:s3cr3t-pw@mirror.lan",
            "https://me:s3cr3t-pw@mirror.lan/v2",
            "https://me:s3cr3t-pw@@mirror.lan",
            "https://me:s3/cr3t-pw@mirror.lan",
            "https://me:s3cr3t-pw://x@mirror.lan",
            "https://me:s3cr3t-pw@",
        ] {
            let e = s.parse::<RegistryUrl>().expect_err(s);
            let msg = e.to_string();
            assert!(
                !msg.contains(SECRET) && !msg.contains("s3cr3t") && !msg.contains("cr3t-pw"),
                "{s}: {msg}"
            );
            assert!(!format!("{e:?}").contains("cr3t"), "{s}: {e:?}");
            assert!(msg.contains(HIDDEN), "{s}: {msg}");
        }
        let e = "https://me:s3cr3t-pw@mirror.lan:5000"
            .parse::<RegistryUrl>()
            .expect_err("login");
        assert_eq!(e.url, "https://<hidden>@mirror.lan:5000");
        assert!(e.to_string().contains("--password-stdin"), "{e}");
    }

    #[test]
    fn redaction_keeps_a_plain_scheme_and_the_server() {
        assert_eq!(redact_userinfo("https://mirror.lan"), "https://mirror.lan");
        assert_eq!(redact_userinfo("https://u:p@mirror.lan"), "https://<hidden>@mirror.lan");
        assert_eq!(redact_userinfo("u:p@mirror.lan"), "<hidden>@mirror.lan");
        assert_eq!(redact_userinfo("u:a b://c@mirror.lan"), "<hidden>@mirror.lan");
        assert_eq!(
            redact_userinfo("https://u:p@x@mirror.lan"),
            "https://<hidden>@mirror.lan"
        );
    }

    #[test]
    fn other_schemes_and_malformed_hosts_are_refused() {
        assert_eq!(problem("ftp://mirror.lan"), "the scheme must be https or http");
        assert_eq!(problem("mirror.lan:5000"), "it has no scheme");
        for s in [
            "https://",
            "https://:5000",
            "https://mirror.lan:",
            "https://mirror.lan:0",
            "https://mirror.lan:65536",
            "https://mirror.lan:50a",
            "https://-bad.lan",
            "https://a..b",
            "https://[::1",
            "https://[zz]:5000",
            "https://mirror lan",
        ] {
            assert_eq!(problem(s), "the host or port is malformed", "{s}");
        }
    }

    #[test]
    fn spellings_of_one_server_are_normalised() {
        assert_eq!(url("HTTPS://Mirror.LAN:443/"), url("https://mirror.lan"));
        assert_eq!(url("https://mirror.lan:443").to_string(), "https://mirror.lan");
        assert_eq!(url("http://localhost:80").host_port(), "localhost");
        assert_eq!(url("https://mirror.lan:80").host_port(), "mirror.lan:80");
    }

    #[test]
    fn docker_hub_api_is_served_from_registry_1() {
        assert_eq!(url("https://docker.io").api_base(), "https://registry-1.docker.io");
        assert_eq!(url("https://docker.io").host_port(), "docker.io");
        assert_eq!(url("http://127.0.0.1:5000").api_base(), "http://127.0.0.1:5000");
    }

    #[test]
    fn serde_round_trips_through_the_normal_form() {
        let u: RegistryUrl = serde_json::from_str("\"https://Mirror.lan:443\"").expect("valid");
        assert_eq!(serde_json::to_string(&u).expect("serializes"), "\"https://mirror.lan\"");
        let e = serde_json::from_str::<RegistryUrl>("\"http://10.0.0.1\"").expect_err("not loopback");
        assert!(e.to_string().contains("http://10.0.0.1"), "{e}");
    }
}
