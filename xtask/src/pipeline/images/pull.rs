//! Pulling one image by digest through the registry candidates, into the
//! blob cache, verifying every byte.
//!
//! The transport (token and basic auth, HTTP on loopback) is oci-client's;
//! the checks are ours: every manifest and blob is hashed here as it is
//! written and must equal the digest that named it, whatever the library
//! already checked. A registry that is down, refuses the login or does not
//! have the image is skipped for the next candidate; one that serves bytes
//! which do not match their digest stops the build.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use archy_agent::manifest::{Digest, PinnedImage};
use archy_agent::registry::Candidate;
use futures_util::StreamExt as _;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::archive::Layer;
use super::cache::Cache;
use super::oci::{self, ImageConfig, Manifest, TARGET_OS};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two reads of one response, not for a whole download.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const PROGRESS_TEMPLATE: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";

/// What one run fetched and what it found in the cache. Every
/// content-addressed object counts: manifests, configs and layers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub downloaded_bytes: u64,
    pub downloaded_blobs: u64,
    pub cached_bytes: u64,
    pub cached_blobs: u64,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.downloaded_bytes += other.downloaded_bytes;
        self.downloaded_blobs += other.downloaded_blobs;
        self.cached_bytes += other.cached_bytes;
        self.cached_blobs += other.cached_blobs;
    }
}

/// One image, complete in the cache.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image manifest's digest: the platform's, for an index.
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<Layer>,
    /// Where the missing parts came from; `None`: all were cached.
    pub source: Option<String>,
}

/// Why one pass over an image stopped.
#[derive(Debug)]
enum Failure {
    /// Cache-only pass: something has to be fetched.
    Missing,
    /// This registry cannot give it; try the next one.
    Unavailable(String),
    /// This registry sent bytes that do not match their digest.
    Mismatch { object: String, detail: String },
    /// Nothing another registry could change (a bad image, a full disk).
    Fatal(anyhow::Error),
}

/// The registry a pass fetches from.
struct Source {
    label: String,
    image: PinnedImage,
    client: Client,
}

pub struct Puller {
    cache: Cache,
    arch: &'static str,
    clients: HashMap<String, Client>,
    /// Fetched during this run: a later cache hit on these is not "from cache".
    fetched: HashSet<Digest>,
    stats: Stats,
}

impl Puller {
    pub fn new(cache: Cache, arch: &'static str) -> Puller {
        Puller {
            cache,
            arch,
            clients: HashMap::new(),
            fetched: HashSet::new(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Makes `image` complete in the cache: from the cache alone when it
    /// can, otherwise from the candidates in order, fetching only what is
    /// missing.
    pub async fn pull(&mut self, app: &str, image: &PinnedImage, candidates: &[Candidate]) -> anyhow::Result<Pulled> {
        match self.walk(image, None).await {
            Ok(pulled) => return Ok(pulled),
            Err(Failure::Missing) => {}
            Err(other) => return Err(self.fatal(app, image, "the cache", other)),
        }
        let mut attempts: Vec<String> = Vec::new();
        for candidate in candidates {
            let source = self.source(candidate)?;
            let failure = match self.login(&source, candidate).await {
                Ok(()) => match self.walk(image, Some(&source)).await {
                    Ok(pulled) => return Ok(pulled),
                    Err(failure) => failure,
                },
                Err(failure) => failure,
            };
            match failure {
                Failure::Unavailable(why) => {
                    println!(
                        "images: {app}: {} failed: {why}; trying the next registry",
                        source.label
                    );
                    attempts.push(format!("{}: {why}", source.label));
                }
                other => return Err(self.fatal(app, image, &source.label, other)),
            }
        }
        anyhow::bail!(
            "{app}: no registry could provide {image}:\n  - {}",
            if attempts.is_empty() {
                "no registry to try".to_owned()
            } else {
                attempts.join("\n  - ")
            }
        )
    }

    fn fatal(&self, app: &str, image: &PinnedImage, from: &str, failure: Failure) -> anyhow::Error {
        match failure {
            Failure::Mismatch { object, detail } => anyhow::anyhow!(
                "{app}: image {image}: {object} from {from} does not match its digest: {detail}. \
                 The build stops: content that differs from what the manifest pins is never used"
            ),
            Failure::Fatal(e) => e.context(format!("{app}: image {image} (from {from})")),
            Failure::Unavailable(why) => anyhow::anyhow!("{app}: image {image}: {from}: {why}"),
            Failure::Missing => anyhow::anyhow!("{app}: image {image}: not in {from}"),
        }
    }

    fn source(&mut self, candidate: &Candidate) -> anyhow::Result<Source> {
        let host = candidate.image.registry().to_owned();
        let label = match &candidate.registry {
            Some(name) => format!("registry `{name}` ({host})"),
            None => format!("{host} (the image's own registry)"),
        };
        let client = match self.clients.get(&host) {
            Some(client) => client.clone(),
            None => {
                let insecure = candidate.insecure || (candidate.registry.is_none() && is_loopback_host_port(&host));
                let config = ClientConfig {
                    protocol: if insecure {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    connect_timeout: Some(CONNECT_TIMEOUT),
                    read_timeout: Some(READ_TIMEOUT),
                    ..ClientConfig::default()
                };
                let client =
                    Client::try_from(config).with_context(|| format!("setting up an OCI client for {label}"))?;
                self.clients.insert(host, client.clone());
                client
            }
        };
        Ok(Source {
            label,
            image: candidate.image.clone(),
            client,
        })
    }

    /// Logs in (basic, or a bearer token from the registry's realm, as
    /// Docker Hub wants), so that a refused login is reported as such.
    async fn login(&self, source: &Source, candidate: &Candidate) -> Result<(), Failure> {
        let auth = match &candidate.credentials {
            Some(c) => RegistryAuth::Basic(c.username().to_owned(), c.password().to_owned()),
            None => RegistryAuth::Anonymous,
        };
        let reference = reference(&source.image, source.image.digest())?;
        source
            .client
            .auth(&reference, &auth, RegistryOperation::Pull)
            .await
            .map(|_| ())
            .map_err(|e| classify(&e, "logging in"))
    }

    /// One pass over the image: every object from the cache, or from
    /// `source` when given.
    async fn walk(&mut self, image: &PinnedImage, source: Option<&Source>) -> Result<Pulled, Failure> {
        let mut hits = Stats::default();
        let top_bytes = self.manifest(image.digest(), source, &mut hits).await?;
        let top = Manifest::parse(&top_bytes)
            .with_context(|| format!("manifest {}", image.digest()))
            .map_err(Failure::Fatal)?;
        let (manifest_digest, manifest) = match top {
            Manifest::Image(m) => (image.digest().clone(), m),
            Manifest::Index(entries) => {
                let entry = oci::choose_platform(&entries, TARGET_OS, self.arch)
                    .with_context(|| format!("index {}", image.digest()))
                    .map_err(Failure::Fatal)?
                    .clone();
                let bytes = self.manifest(&entry.digest, source, &mut hits).await?;
                match Manifest::parse(&bytes) {
                    Ok(Manifest::Image(m)) => (entry.digest, m),
                    Ok(Manifest::Index(_)) => {
                        return Err(Failure::Fatal(anyhow::anyhow!(
                            "the index {} names another index ({}) for {TARGET_OS}/{}",
                            image.digest(),
                            entry.digest,
                            self.arch
                        )))
                    }
                    Err(e) => return Err(Failure::Fatal(e.context(format!("manifest {}", entry.digest)))),
                }
            }
        };

        let config_digest = manifest.config.digest.clone();
        self.blob(&config_digest, manifest.config.size, "config", source, &mut hits)
            .await?;
        let config = self
            .cache
            .read_verified(&config_digest)
            .map_err(Failure::Fatal)?
            .ok_or(Failure::Missing)?;
        ImageConfig::parse(&config)
            .and_then(|c| c.check(TARGET_OS, self.arch, manifest.layers.len()))
            .with_context(|| format!("config {config_digest}"))
            .map_err(Failure::Fatal)?;

        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            self.blob(&layer.digest, layer.size, "layer", source, &mut hits).await?;
            layers.push(Layer {
                digest: layer.digest.clone(),
                path: self.cache.path(&layer.digest),
            });
        }
        self.stats.add(hits);
        Ok(Pulled {
            manifest_digest,
            config_digest,
            config,
            layers,
            source: source.map(|s| s.label.clone()),
        })
    }

    fn hit(&self, digest: &Digest, size: u64, hits: &mut Stats) {
        if !self.fetched.contains(digest) {
            hits.cached_blobs += 1;
            hits.cached_bytes += size;
        }
    }

    /// A manifest by digest: cached, or fetched and checked.
    async fn manifest(
        &mut self,
        digest: &Digest,
        source: Option<&Source>,
        hits: &mut Stats,
    ) -> Result<Vec<u8>, Failure> {
        if let Some(bytes) = self.cache.read_verified(digest).map_err(Failure::Fatal)? {
            self.hit(digest, bytes.len() as u64, hits);
            return Ok(bytes);
        }
        let source = source.ok_or(Failure::Missing)?;
        let started = Instant::now();
        let reference = reference(&source.image, digest)?;
        let (bytes, _) = source
            .client
            .pull_manifest_raw(&reference, &RegistryAuth::Anonymous, oci::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| match classify(&e, "fetching the manifest") {
                Failure::Mismatch { detail, .. } => Failure::Mismatch {
                    object: format!("manifest {digest}"),
                    detail,
                },
                other => other,
            })?;
        match self.cache.put(digest, &bytes).map_err(Failure::Fatal)? {
            Ok(()) => {}
            Err(m) => {
                return Err(Failure::Mismatch {
                    object: format!("manifest {digest}"),
                    detail: format!("its {} bytes hash to {}", m.size, m.actual),
                })
            }
        }
        self.fetched(digest, bytes.len() as u64, "manifest", &source.label, started);
        Ok(bytes.to_vec())
    }

    fn fetched(&mut self, digest: &Digest, size: u64, kind: &str, from: &str, started: Instant) {
        self.fetched.insert(digest.clone());
        self.stats.downloaded_blobs += 1;
        self.stats.downloaded_bytes += size;
        println!(
            "images:   fetched {kind} {} ({}) from {from} in {:.1}s",
            short(digest),
            HumanBytes(size),
            started.elapsed().as_secs_f64()
        );
    }

    /// A config or layer blob: cached, or streamed into the cache and
    /// checked against its digest and the size its descriptor gives.
    async fn blob(
        &mut self,
        digest: &Digest,
        size: u64,
        kind: &str,
        source: Option<&Source>,
        hits: &mut Stats,
    ) -> Result<(), Failure> {
        match self.cache.size(digest) {
            Some(cached) if cached == size => {
                self.hit(digest, size, hits);
                return Ok(());
            }
            // Its name says one thing, its size another: fetch it again.
            Some(_) => self.cache.evict(digest).map_err(Failure::Fatal)?,
            None => {}
        }
        let source = source.ok_or(Failure::Missing)?;
        let started = Instant::now();
        let object = format!("{kind} blob {digest}");
        let reference = reference(&source.image, digest)?;
        let mut stream = source
            .client
            .pull_blob_stream(&reference, digest.as_str())
            .await
            .map_err(|e| classify(&e, &format!("fetching {object}")))?;
        let content_length = stream.content_length;
        let mut writer = self.cache.writer(digest).map_err(Failure::Fatal)?;
        let bar = progress_bar(size, &format!("{kind} {}", short(digest)));
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    if writer.written() + bytes.len() as u64 > size {
                        bar.finish_and_clear();
                        return Err(Failure::Mismatch {
                            object,
                            detail: format!("the registry sent more than the {size} bytes the manifest names"),
                        });
                    }
                    writer.write(&bytes).map_err(Failure::Fatal)?;
                    bar.inc(bytes.len() as u64);
                }
                Err(e) => {
                    bar.finish_and_clear();
                    // The whole body arrived and the library's own check
                    // failed: the content is wrong, not the connection.
                    if content_length == Some(writer.written()) {
                        let actual = writer.digest_so_far();
                        if actual != *digest {
                            return Err(Failure::Mismatch {
                                object,
                                detail: format!("its {} bytes hash to {actual}", writer.written()),
                            });
                        }
                    }
                    return Err(Failure::Unavailable(format!(
                        "fetching {object}: the download broke off after {} of {size} bytes: {}",
                        writer.written(),
                        chain(&e)
                    )));
                }
            }
        }
        bar.finish_and_clear();
        let written = writer.written();
        if let Err(m) = writer.finish().map_err(Failure::Fatal)? {
            return Err(Failure::Mismatch {
                object,
                detail: format!("its {} bytes hash to {}", m.size, m.actual),
            });
        }
        if written != size {
            // Right digest, wrong size: the manifest's descriptor is wrong.
            return Err(Failure::Fatal(anyhow::anyhow!(
                "{object} has {written} bytes but its descriptor says {size}"
            )));
        }
        self.fetched(digest, size, kind, &source.label, started);
        Ok(())
    }
}

fn reference(image: &PinnedImage, digest: &Digest) -> Result<Reference, Failure> {
    let text = format!("{}/{}@{digest}", image.registry(), image.repository());
    text.parse::<Reference>()
        .with_context(|| format!("{text} is not a reference the OCI client accepts"))
        .map_err(Failure::Fatal)
}

/// Digest problems are the content's fault; everything else (refused
/// connections, 401, 404, a broken token service) is this registry's.
fn classify(e: &OciDistributionError, doing: &str) -> Failure {
    match e {
        OciDistributionError::DigestError(d) => Failure::Mismatch {
            object: String::new(),
            detail: d.to_string(),
        },
        other => Failure::Unavailable(format!("{doing}: {}", chain(other))),
    }
}

/// An error with its causes, `a: b: c`, without repeats.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// `sha256:` and the first 12 hex characters, for progress lines.
fn short(digest: &Digest) -> String {
    format!("sha256:{}", &digest.hex()[..12])
}

/// Loopback hosts, as Docker treats them: plain HTTP by default. The
/// agent's rule ([`archy_agent::registry::is_loopback`]) on the host
/// without its port.
fn is_loopback_host_port(host_port: &str) -> bool {
    let host = match host_port.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    };
    archy_agent::registry::is_loopback(host)
}

/// A download bar; indicatif draws nothing when stderr is not a terminal.
fn progress_bar(size: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(PROGRESS_TEMPLATE) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::images::fake_registry::{FakeRegistry, SERVICE};
    use archy_agent::registry::{candidates, Credentials, Registry};

    const REPOSITORY: &str = "library/fake";

    /// An index with an arm64 and an amd64 image, each one layer, on a fake
    /// Docker Hub. Returns the pinned image (the index's digest), the amd64
    /// manifest's digest and its layer's digest.
    fn publish(hub: &FakeRegistry) -> (PinnedImage, Digest, Digest) {
        let mut platform_manifests = Vec::new();
        let mut amd64 = None;
        for arch in ["arm64", "amd64"] {
            let layer = hub.add_blob(format!("layer bytes for {arch}").into_bytes());
            let diff_id = Digest::of(format!("uncompressed {arch}").as_bytes());
            let config = format!(
                r#"{{"architecture":"{arch}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
            );
            let config_len = config.len();
            let config_digest = hub.add_blob(config.into_bytes());
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{config_len},"digest":"{config_digest}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":{},"digest":"{layer}"}}]}}"#,
                oci::DOCKER_MANIFEST,
                format!("layer bytes for {arch}").len()
            );
            let size = manifest.len();
            let digest = hub.add_manifest(oci::DOCKER_MANIFEST, manifest.into_bytes());
            platform_manifests.push(format!(
                r#"{{"mediaType":"{}","size":{size},"digest":"{digest}","platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                oci::DOCKER_MANIFEST
            ));
            if arch == "amd64" {
                amd64 = Some((digest, layer));
            }
        }
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            oci::DOCKER_MANIFEST_LIST,
            platform_manifests.join(",")
        );
        let index_digest = hub.add_manifest(oci::DOCKER_MANIFEST_LIST, index.into_bytes());
        let image: PinnedImage = format!("{}/{REPOSITORY}:1@{index_digest}", hub.host)
            .parse()
            .expect("pinned");
        let (manifest, layer) = amd64.expect("amd64 was published");
        (image, manifest, layer)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn hub_registry(hub: &FakeRegistry, login: Option<(&str, &str)>) -> Registry {
        let url = format!("http://{}", hub.host).parse().expect("url");
        let registry = Registry::new("hub", url, 100).expect("registry");
        match login {
            Some((user, password)) => registry.with_credentials(Credentials::new(user, password).expect("creds")),
            None => registry,
        }
    }

    #[test]
    fn a_bearer_realm_token_is_fetched_and_the_index_resolves_to_amd64() {
        let hub = FakeRegistry::start();
        let (image, amd64_manifest, amd64_layer) = publish(&hub);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut puller = Puller::new(Cache::open(dir.path()).expect("cache"), "amd64");
        let list = candidates(&image, &[]);
        let pulled = runtime()
            .block_on(puller.pull("hub-app", &image, &list))
            .expect("pulls through the token flow");
        assert_eq!(pulled.manifest_digest, amd64_manifest);
        assert_eq!(pulled.layers.len(), 1);
        assert_eq!(pulled.layers[0].digest, amd64_layer);
        let log = hub.log();
        let scope = format!("scope=repository%3A{}%3Apull", REPOSITORY.replace('/', "%2F"));
        assert!(
            log.iter()
                .any(|l| l.starts_with("/token?") && l.contains(&scope) && l.contains(SERVICE)),
            "{log:#?}"
        );
        assert!(
            log.iter()
                .filter(|l| l.contains("/blobs/") || l.contains("/manifests/"))
                .all(|l| l.ends_with("[Bearer fake-hub-token]")),
            "{log:#?}"
        );
        // The arm64 image was never fetched.
        assert!(!log.iter().any(|l| l.contains("arm64")), "{log:#?}");
        // Three manifests/blobs... index, amd64 manifest, config, layer.
        assert_eq!(puller.stats().downloaded_blobs, 4);

        // A second pull needs nothing from the registry.
        let before = hub.log().len();
        let mut again = Puller::new(Cache::open(dir.path()).expect("cache"), "amd64");
        let cached = runtime()
            .block_on(again.pull("hub-app", &image, &list))
            .expect("cached");
        assert_eq!(cached.source, None);
        assert_eq!(hub.log().len(), before);
        assert_eq!(again.stats().downloaded_bytes, 0);
        assert_eq!(again.stats().cached_blobs, 4);
    }

    #[test]
    fn a_login_is_sent_to_the_token_realm_and_its_absence_fails() {
        let hub = FakeRegistry::start();
        hub.require_login("node-1", "s3cret");
        let (image, amd64_manifest, _) = publish(&hub);
        let dir = tempfile::tempdir().expect("tempdir");

        let mut anonymous = Puller::new(Cache::open(dir.path()).expect("cache"), "amd64");
        let err = runtime()
            .block_on(anonymous.pull("hub-app", &image, &candidates(&image, &[])))
            .expect_err("the realm refuses an anonymous token");
        let msg = format!("{err:#}");
        assert!(msg.contains("no registry could provide"), "{msg}");
        assert!(msg.contains(&hub.host), "{msg}");

        let registries = [hub_registry(&hub, Some(("node-1", "s3cret")))];
        let mut logged_in = Puller::new(Cache::open(dir.path()).expect("cache"), "amd64");
        let pulled = runtime()
            .block_on(logged_in.pull("hub-app", &image, &candidates(&image, &registries)))
            .expect("pulls with the login");
        assert_eq!(pulled.manifest_digest, amd64_manifest);
        assert!(hub
            .log()
            .iter()
            .any(|l| l.starts_with("/token?") && l.ends_with("[Basic bm9kZS0xOnMzY3JldA==]")));
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_stops_the_build_naming_it() {
        let hub = FakeRegistry::start();
        let (image, _, layer) = publish(&hub);
        // Same length, other bytes: only the digest can tell.
        hub.replace_blob(&layer, b"LAYER BYTES FOR AMD64".to_vec());
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let mut puller = Puller::new(cache.clone(), "amd64");
        // A second candidate that has everything must not be tried.
        let backup = FakeRegistry::start();
        publish(&backup);
        let url = format!("http://{}", backup.host).parse().expect("url");
        let registries = [Registry::new("backup", url, 200).expect("registry")];
        let err = runtime()
            .block_on(puller.pull("hub-app", &image, &candidates(&image, &registries)))
            .expect_err("tampered");
        let msg = format!("{err:#}");
        assert!(msg.contains("hub-app"), "{msg}");
        assert!(msg.contains(&image.to_string()), "{msg}");
        assert!(msg.contains(&format!("layer blob {layer}")), "{msg}");
        assert!(
            msg.contains(&format!("{} (the image's own registry)", hub.host)),
            "{msg}"
        );
        assert!(backup.log().is_empty(), "{:?}", backup.log());
        assert_eq!(cache.size(&layer), None, "the bad bytes never enter the cache");
    }

    #[test]
    fn loopback_hosts_are_recognised_with_and_without_ports() {
        for yes in ["127.0.0.1:5000", "127.1.2.3", "localhost:80", "[::1]:5000", "LOCALHOST"] {
            assert!(is_loopback_host_port(yes), "{yes}");
        }
        for no in ["docker.io", "10.0.0.1:5000", "mirror.lan", "[::2]:1"] {
            assert!(!is_loopback_host_port(no), "{no}");
        }
    }
}
