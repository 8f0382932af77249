//! Image references that are pinned by digest.
//!
//! A tag can move; a digest cannot. Everything the agent pulls, imports or
//! runs is named by a [`PinnedImage`], and the only way to build one is to
//! parse a string that carries `@sha256:<64 hex>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Registry used when a reference names none (Docker's convention).
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// Why a string is not a pinned image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("image is not pinned by digest: expected `name[:tag]@sha256:<64 lowercase hex>`")]
    NotPinned,
    #[error("digest must be `sha256:` followed by 64 lowercase hex characters")]
    BadDigest,
    #[error("repository name is empty or has characters outside [a-z0-9._/-]")]
    BadName,
    #[error("tag must be 1-128 characters of [A-Za-z0-9_.-] and not start with '.' or '-'")]
    BadTag,
}

/// A sha256 content digest, `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The 64 hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::{Digest as _, Sha256};
        Digest(format!("sha256:{:x}", Sha256::digest(bytes)))
    }
}

impl FromStr for Digest {
    type Err = ImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("sha256:").ok_or(ImageRefError::BadDigest)?;
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Digest(s.to_owned()))
        } else {
            Err(ImageRefError::BadDigest)
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageRefError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[registry/]repository[:tag]@sha256:<hex>`: an image reference that
/// cannot exist without its digest.
///
/// ```
/// use archy_agent::manifest::{ImageRefError, PinnedImage};
///
/// let hex = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";
/// let pinned: PinnedImage = format!("docker.io/getumbrel/electrs:v0.10.10@sha256:{hex}").parse()?;
/// assert_eq!(pinned.by_digest(), format!("docker.io/getumbrel/electrs@sha256:{hex}"));
///
/// // A tag alone can move, so it is not an image the agent will run.
/// let tag_only = "docker.io/getumbrel/electrs:v0.10.10".parse::<PinnedImage>();
/// assert_eq!(tag_only, Err(ImageRefError::NotPinned));
/// # Ok::<(), ImageRefError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PinnedImage {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Digest,
    /// Whether the original string named its registry; kept so that
    /// `Display` round-trips what the manifest author wrote.
    explicit_registry: bool,
}

impl PinnedImage {
    /// Registry host (and port), `docker.io` when the reference names none.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path inside the registry. Docker Hub's single-name
    /// images live under `library/`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// `registry/repository@digest`: the exact, tag-free name to pull.
    pub fn by_digest(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repository, self.digest)
    }

    /// The same content addressed through another registry (a mirror).
    pub fn with_registry(&self, registry: &str) -> PinnedImage {
        PinnedImage {
            registry: registry.to_owned(),
            explicit_registry: true,
            ..self.clone()
        }
    }
}

fn is_registry_component(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        })
}

fn valid_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && !tag.starts_with(['.', '-'])
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl FromStr for PinnedImage {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, digest) = s.rsplit_once('@').ok_or(ImageRefError::NotPinned)?;
        let digest: Digest = digest.parse()?;
        let (registry, rest, explicit_registry) = match name.split_once('/') {
            Some((first, rest)) if is_registry_component(first) => (first.to_owned(), rest, true),
            _ => (DEFAULT_REGISTRY.to_owned(), name, false),
        };
        if registry.is_empty() || registry.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ImageRefError::BadName);
        }
        // A ':' after the last '/' separates the tag; one before it is a port.
        let (repo, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ImageRefError::BadTag);
            }
        }
        if !valid_repository(repo) {
            return Err(ImageRefError::BadName);
        }
        let repository = if registry == DEFAULT_REGISTRY && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_owned()
        };
        Ok(PinnedImage {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
            explicit_registry,
        })
    }
}

impl TryFrom<String> for PinnedImage {
    type Error = ImageRefError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PinnedImage> for String {
    fn from(p: PinnedImage) -> String {
        p.to_string()
    }
}

impl fmt::Display for PinnedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.explicit_registry {
            write!(f, "{}/", self.registry)?;
        }
        let repo = match (self.explicit_registry, self.repository.strip_prefix("library/")) {
            (false, Some(short)) => short,
            _ => &self.repository,
        };
        f.write_str(repo)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        write!(f, "@{}", self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    #[test]
    fn full_reference_splits_into_registry_repository_tag_and_digest() {
        let r: PinnedImage = format!("docker.io/getumbrel/electrs:v0.10.10@sha256:{HEX}")
            .parse()
            .expect("valid");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "getumbrel/electrs");
        assert_eq!(r.tag(), Some("v0.10.10"));
        assert_eq!(r.digest().hex(), HEX);
        assert_eq!(r.by_digest(), format!("docker.io/getumbrel/electrs@sha256:{HEX}"));
    }

    #[test]
    fn registry_with_port_is_not_mistaken_for_a_tag() {
        let r: PinnedImage = format!("127.0.0.1:5055/test/busybox@sha256:{HEX}")
            .parse()
            .expect("valid");
        assert_eq!(r.registry(), "127.0.0.1:5055");
        assert_eq!(r.repository(), "test/busybox");
        assert_eq!(r.tag(), None);
    }

    #[test]
    fn single_name_on_docker_hub_lives_under_library() {
        let r: PinnedImage = format!("nginx:1.27-alpine@sha256:{HEX}").parse().expect("valid");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/nginx");
        assert_eq!(r.to_string(), format!("nginx:1.27-alpine@sha256:{HEX}"));
    }

    #[test]
    fn display_round_trips_what_was_written() {
        for s in [
            format!("docker.io/library/mariadb:lts@sha256:{HEX}"),
            format!("localhost/archy/ui@sha256:{HEX}"),
            format!("ghcr.io/a/b/c@sha256:{HEX}"),
        ] {
            let r: PinnedImage = s.parse().expect("valid");
            assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn a_tag_alone_is_refused() {
        assert_eq!(
            "docker.io/getumbrel/electrs:v0.10.10".parse::<PinnedImage>(),
            Err(ImageRefError::NotPinned)
        );
    }

    #[test]
    fn malformed_digests_are_refused() {
        for bad in [
            "x@sha256:abc".to_owned(),
            format!("x@sha512:{HEX}"),
            format!("x@sha256:{}", HEX.to_uppercase()),
            format!("x@sha256:{HEX}0"),
        ] {
            assert_eq!(bad.parse::<PinnedImage>(), Err(ImageRefError::BadDigest), "{bad}");
        }
    }

    #[test]
    fn malformed_names_and_tags_are_refused() {
        assert_eq!(
            format!("Upper/x@sha256:{HEX}").parse::<PinnedImage>(),
            Err(ImageRefError::BadName)
        );
        assert_eq!(
            format!("@sha256:{HEX}").parse::<PinnedImage>(),
            Err(ImageRefError::BadName)
        );
        assert_eq!(
            format!("x:-bad@sha256:{HEX}").parse::<PinnedImage>(),
            Err(ImageRefError::BadTag)
        );
    }

    #[test]
    fn with_registry_keeps_the_digest() {
        let r: PinnedImage = format!("docker.io/getumbrel/electrs:v1@sha256:{HEX}")
            .parse()
            .expect("valid");
        let m = r.with_registry("mirror.local:5000");
        assert_eq!(
            m.by_digest(),
            format!("mirror.local:5000/getumbrel/electrs@sha256:{HEX}")
        );
        assert_eq!(m.digest(), r.digest());
    }

    #[test]
    fn digest_of_bytes_matches_sha256() {
        // sha256("") is a well-known constant.
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn tag_and_digest_are_both_kept() {
        let r: PinnedImage = format!("ghcr.io/org/app:2.1@sha256:{HEX}").parse().expect("valid");
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "org/app");
        assert_eq!(r.tag(), Some("2.1"));
        assert_eq!(r.by_digest(), format!("ghcr.io/org/app@sha256:{HEX}"));
    }

    #[test]
    fn digest_without_algorithm_or_name_is_refused() {
        assert_eq!(
            format!("nginx@{HEX}").parse::<PinnedImage>(),
            Err(ImageRefError::BadDigest)
        );
        assert_eq!(
            format!("nginx:1@{HEX}").parse::<Digest>(),
            Err(ImageRefError::BadDigest)
        );
        assert_eq!(
            format!("sha256:{HEX}").parse::<Digest>().map(|d| d.hex().to_owned()),
            Ok(HEX.to_owned())
        );
    }

    #[test]
    fn pinned_image_deserializes_only_from_a_pinned_string() {
        let ok: PinnedImage = serde_json::from_str(&format!("\"busybox@sha256:{HEX}\"")).expect("pinned");
        assert_eq!(ok.repository(), "library/busybox");
        let err = serde_json::from_str::<PinnedImage>("\"busybox:latest\"").expect_err("tag only");
        assert!(err.to_string().contains("not pinned by digest"), "{err}");
    }
}
