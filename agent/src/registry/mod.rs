//! The registries a node pulls images from: a priority list kept in
//! `<data>/config/registries.json`, the order in which to try them for one
//! image, and a reachability probe.
//!
//! Every configured registry is tried for every image, mirror-style: a pull
//! is by digest, so whatever server answers, the content is the one the
//! manifest pinned. The format and the order rule are documented in
//! `docs/registries.md`.
//!
//! The orchestrator's entry points are [`RegistryStore::open`] and
//! [`candidates`]; [`Prober`] is what `archy-agent registry test` runs.

mod candidates;
pub mod commands;
mod probe;
mod store;
mod url;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::dataroot::REGISTRIES_FILE;
pub use candidates::{candidates, Candidate, OWN_REGISTRY_PRIORITY};
pub use probe::{AuthOutcome, ProbeReport, ProbeSetupError, Prober, PROBE_TIMEOUT};
pub use store::{RegistryStore, StoreError};
pub use url::{is_loopback, redact_userinfo, RegistryUrl, UrlError, URL_RULE};

/// Priority given by `registry add` when none is named: before an image's
/// own registry ([`OWN_REGISTRY_PRIORITY`]), as a local mirror wants.
pub const DEFAULT_PRIORITY: i32 = 50;

/// Why a registry entry cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "registry name `{0}` is not allowed: use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error(transparent)]
    BadUrl(#[from] UrlError),
    #[error("the registry username is empty")]
    EmptyUsername,
    #[error("the registry username contains ':' or a control character, which basic auth cannot carry")]
    BadUsername,
    #[error("the registry password is empty")]
    EmptyPassword,
}

/// A login for one registry. `Debug` hides the password and there is no
/// `Display` and no `Serialize`, so it cannot end up in output by accident;
/// only the store writes it, to a file of mode 0600.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Result<Credentials, RegistryError> {
        let (username, password) = (username.into(), password.into());
        if username.is_empty() {
            return Err(RegistryError::EmptyUsername);
        }
        if username.chars().any(|c| c == ':' || c.is_control()) {
            return Err(RegistryError::BadUsername);
        }
        if password.is_empty() {
            return Err(RegistryError::EmptyPassword);
        }
        Ok(Credentials { username, password })
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// The secret itself: hand it to the engine or an HTTP request, never
    /// to a log line or a table.
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// A configured registry. Not `Serialize`: output goes through
/// [`RegistrySummary`], which has no place for a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub name: String,
    pub url: RegistryUrl,
    /// Lower is tried first; see [`candidates`].
    pub priority: i32,
    pub credentials: Option<Credentials>,
}

impl Registry {
    /// A registry with a checked name and no credentials.
    pub fn new(name: &str, url: RegistryUrl, priority: i32) -> Result<Registry, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        Ok(Registry {
            name: name.to_owned(),
            url,
            priority,
            credentials: None,
        })
    }

    pub fn with_credentials(mut self, credentials: Credentials) -> Registry {
        self.credentials = Some(credentials);
        self
    }

    /// What may be shown about this registry.
    pub fn summary(&self) -> RegistrySummary {
        RegistrySummary {
            name: self.name.clone(),
            url: self.url.to_string(),
            priority: self.priority,
            auth: self.credentials.is_some(),
        }
    }
}

/// The printable view of a [`Registry`]: whether it has credentials, never
/// what they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySummary {
    pub name: String,
    pub url: String,
    pub priority: i32,
    pub auth: bool,
}

/// 1-63 of `[a-z0-9._-]`, starting with a letter or digit.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Orders registries by priority, then name: the order of `list` and of
/// [`candidates`].
fn sort(registries: &mut [Registry]) {
    registries.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Pa55word";

    fn with_secret() -> Registry {
        let url = "https://mirror.lan:5000".parse().expect("valid url");
        Registry::new("lan", url, 10)
            .expect("valid name")
            .with_credentials(Credentials::new("me", SECRET).expect("valid credentials"))
    }

    #[test]
    fn debug_and_summary_never_contain_the_password() {
        let r = with_secret();
        let debug = format!("{r:?} {:?} {:#?}", r.credentials, r);
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("<hidden>"), "{debug}");
        let summary = r.summary();
        let json = serde_json::to_string(&summary).expect("serializes");
        assert!(!json.contains(SECRET), "{json}");
        assert!(json.contains("\"auth\":true"), "{json}");
        assert!(!format!("{summary:?}").contains(SECRET));
    }

    /// The example in docs/registries.md parses, and gives the order the
    /// text around it promises.
    #[test]
    fn the_documented_example_file_gives_the_documented_order() {
        let doc = include_str!("../../../docs/registries.md");
        let json = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the doc has a json example");
        let registries = store::parse(std::path::Path::new("docs/registries.md"), json.as_bytes()).expect("valid");
        let hex = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";
        let order = |image: String| -> Vec<String> {
            let image = image.parse().expect("pinned");
            candidates(&image, &registries)
                .into_iter()
                .map(|c| {
                    format!(
                        "{}{}",
                        c.image.registry(),
                        if c.credentials.is_some() { " (login)" } else { "" }
                    )
                })
                .collect()
        };
        assert_eq!(
            order(format!("docker.io/getumbrel/electrs:v0.10.10@sha256:{hex}")),
            ["mirror.lan:5000", "ghcr.io (login)", "docker.io", "backup.example.org"]
        );
        assert_eq!(
            order(format!("ghcr.io/org/app@sha256:{hex}")),
            ["mirror.lan:5000", "ghcr.io (login)", "backup.example.org"]
        );
    }

    #[test]
    fn names_are_checked() {
        let url: RegistryUrl = "https://ghcr.io".parse().expect("valid url");
        for ok in ["ghcr", "lan-mirror", "a", "docker.io", "x_1"] {
            assert!(Registry::new(ok, url.clone(), 0).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "Upper", "a b", "a/b", &"x".repeat(64)] {
            assert_eq!(
                Registry::new(bad, url.clone(), 0),
                Err(RegistryError::BadName(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn credentials_are_checked() {
        assert_eq!(Credentials::new("", "p"), Err(RegistryError::EmptyUsername));
        assert_eq!(Credentials::new("a:b", "p"), Err(RegistryError::BadUsername));
        assert_eq!(Credentials::new("a\nb", "p"), Err(RegistryError::BadUsername));
        assert_eq!(Credentials::new("a", ""), Err(RegistryError::EmptyPassword));
        let c = Credentials::new("a", "p:with:colons").expect("valid");
        assert_eq!((c.username(), c.password()), ("a", "p:with:colons"));
    }
}
