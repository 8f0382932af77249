//! `<data>/config/registries.json`: the configured registries and their
//! credentials, in one file of mode 0600 that is replaced atomically.
//!
//! One file rather than a separate credentials file: a single rename
//! changes both together, so a crash can never leave a registry without
//! the login that belongs to it, or the other way round.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{sort, Credentials, Registry, RegistryUrl};
use crate::dataroot::DataRoot;
use crate::fsutil;

/// The only format version this agent reads and writes.
const FORMAT_VERSION: u32 = 1;
/// Far more than any real list; a bigger file is not ours.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
const FILE_MODE: u32 = 0o600;

/// What went wrong reading or changing the registry list.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file exists but is not a registry list. It is left as it is, so
    /// that nothing in it is lost.
    #[error("{} is not a valid registry list: {problem} (the file was left unchanged; fix or remove it)", path.display())]
    Corrupt { path: PathBuf, problem: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("a registry named `{0}` already exists; remove it first to change it")]
    DuplicateName(String),
    #[error("registry `{existing}` already points at {url}")]
    DuplicateUrl { url: String, existing: String },
    #[error("no registry named `{0}`")]
    UnknownName(String),
    /// A list meant to travel (inside an image) holds a login. Names the
    /// file, the registry and the field, never the value.
    #[error(
        "{}: registry `{registry}` has a login (its field `auth`); an image never carries \
         registry credentials: remove `auth` from the file and add the login on the node with \
         `archy-agent registry add {registry} {url} --username USER --password-stdin` (after removing the \
         registry there with `archy-agent registry remove {registry}`)",
        path.display()
    )]
    CredentialsInFile {
        path: PathBuf,
        registry: String,
        url: String,
    },
}

/// The file as written. Unknown fields are refused: a misspelt key must not
/// silently drop a setting.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    registries: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    url: RegistryUrl,
    priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<Auth>,
}

/// Only ever serialized into the 0600 file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    username: String,
    password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The registry list of one data root.
///
/// Changes are read-modify-write of the whole file: two processes changing
/// it at the same moment can lose one change (never corrupt the file).
#[derive(Debug)]
pub struct RegistryStore {
    path: PathBuf,
    /// Sorted by priority, then name.
    registries: Vec<Registry>,
}

impl RegistryStore {
    /// Reads the list of `data_root`. A missing file is an empty list; a
    /// file that cannot be parsed is an error naming it, never reset.
    pub fn open(data_root: &DataRoot) -> Result<RegistryStore, StoreError> {
        let path = data_root.registries();
        let registries = match read_limited(&path) {
            Ok(bytes) => parse(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(RegistryStore { path, registries })
    }

    /// Reads a registry list from `path`, a file in the same format kept
    /// anywhere (the image builder's `--registries FILE`). Unlike
    /// [`RegistryStore::open`], a missing file is an error: it was named.
    pub fn open_file(path: &Path) -> Result<RegistryStore, StoreError> {
        let bytes = read_limited(path).map_err(|source| StoreError::Read {
            path: path.to_owned(),
            source,
        })?;
        let registries = parse(path, &bytes)?;
        Ok(RegistryStore {
            path: path.to_owned(),
            registries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a list that holds a login: one that goes into an image
    /// (the image builder's `--registries FILE`) must not, since anyone
    /// with the image could read it. The error names the first registry
    /// with a login, never the login itself.
    pub fn refuse_credentials(&self) -> Result<(), StoreError> {
        match self.registries.iter().find(|r| r.credentials.is_some()) {
            None => Ok(()),
            Some(r) => Err(StoreError::CredentialsInFile {
                path: self.path.clone(),
                registry: r.name.clone(),
                url: r.url.to_string(),
            }),
        }
    }

    /// Every registry, by priority then name.
    pub fn registries(&self) -> &[Registry] {
        &self.registries
    }

    pub fn get(&self, name: &str) -> Option<&Registry> {
        self.registries.iter().find(|r| r.name == name)
    }

    /// Adds a registry and writes the file. A name or a server already in
    /// the list is refused: changing an entry is an explicit remove and add.
    pub fn add(&mut self, registry: Registry) -> Result<(), StoreError> {
        if self.get(&registry.name).is_some() {
            return Err(StoreError::DuplicateName(registry.name));
        }
        if let Some(existing) = self.registries.iter().find(|r| same_server(&r.url, &registry.url)) {
            return Err(StoreError::DuplicateUrl {
                url: registry.url.to_string(),
                existing: existing.name.clone(),
            });
        }
        let mut next = self.registries.clone();
        next.push(registry);
        sort(&mut next);
        self.save(next)
    }

    /// Removes the registry called `name` and writes the file; returns it.
    pub fn remove(&mut self, name: &str) -> Result<Registry, StoreError> {
        let index = self
            .registries
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| StoreError::UnknownName(name.to_owned()))?;
        let mut next = self.registries.clone();
        let removed = next.remove(index);
        self.save(next)?;
        Ok(removed)
    }

    /// Writes `registries` and, once that worked, keeps them.
    fn save(&mut self, registries: Vec<Registry>) -> Result<(), StoreError> {
        let file = FileFormat {
            version: FORMAT_VERSION,
            registries: registries.iter().map(entry).collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.registries = registries;
        Ok(())
    }
}

/// One server, whatever the scheme: `http://` and `https://` to the same
/// `host:port` would give one pull candidate.
fn same_server(a: &RegistryUrl, b: &RegistryUrl) -> bool {
    a.host_port() == b.host_port()
}

fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the file is {len} bytes, more than the {MAX_FILE_BYTES} allowed"),
        ));
    }
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        // Readable by others already; the next write replaces it with 0600.
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "registry list is not private");
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    io::Read::read_to_end(&mut io::Read::take(file, MAX_FILE_BYTES + 1), &mut bytes)?;
    Ok(bytes)
}

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Registry>, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let file: FileFormat = serde_path_to_error::deserialize(de)
        .map_err(|e| {
            let at = e.path().to_string();
            if at == "." {
                e.into_inner().to_string()
            } else {
                format!("{at}: {}", e.into_inner())
            }
        })
        .map_err(corrupt)?;
    if file.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "version: {} is not supported, this agent reads version {FORMAT_VERSION}",
            file.version
        )));
    }
    let mut registries: Vec<Registry> = Vec::with_capacity(file.registries.len());
    for (i, e) in file.registries.into_iter().enumerate() {
        let mut registry =
            Registry::new(&e.name, e.url, e.priority).map_err(|err| corrupt(format!("registries[{i}].name: {err}")))?;
        if let Some(auth) = e.auth {
            let creds = Credentials::new(auth.username, auth.password)
                .map_err(|err| corrupt(format!("registries[{i}].auth: {err}")))?;
            registry = registry.with_credentials(creds);
        }
        if let Some(other) = registries.iter().find(|r| r.name == registry.name) {
            return Err(corrupt(format!(
                "registries[{i}].name: `{}` is listed twice",
                other.name
            )));
        }
        if let Some(other) = registries.iter().find(|r| same_server(&r.url, &registry.url)) {
            return Err(corrupt(format!(
                "registries[{i}].url: {} is the same server as registry `{}`",
                registry.url, other.name
            )));
        }
        registries.push(registry);
    }
    sort(&mut registries);
    Ok(registries)
}

fn entry(r: &Registry) -> Entry {
    Entry {
        name: r.name.clone(),
        url: r.url.clone(),
        priority: r.priority,
        auth: r.credentials.as_ref().map(|c| Auth {
            username: c.username().to_owned(),
            password: c.password().to_owned(),
        }),
    }
}

/// Replaces the list file atomically (see [`fsutil::write_atomic`]) in a
/// folder that is 0700: it holds credentials.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no parent folder"))?;
    fsutil::ensure_private_dir(dir)?;
    fsutil::write_atomic(path, bytes, FILE_MODE)
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};

    use super::*;
    use crate::dataroot::REGISTRIES_FILE;

    fn reg(name: &str, url: &str, priority: i32) -> Registry {
        Registry::new(name, url.parse().expect("valid url"), priority).expect("valid name")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("exists").permissions().mode() & 0o777
    }

    #[test]
    fn open_file_reads_any_path_and_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mirrors.json");
        let missing = RegistryStore::open_file(&path).expect_err("missing");
        assert!(matches!(missing, StoreError::Read { .. }), "{missing:?}");
        assert!(missing.to_string().contains("mirrors.json"), "{missing}");
        fs::write(
            &path,
            "{\"version\": 1, \"registries\": [{\"name\": \"b\", \"url\": \"https://b.example\", \"priority\": 2}, {\"name\": \"a\", \"url\": \"http://127.0.0.1:5000\", \"priority\": 1}]}",
        )
        .expect("write");
        let store = RegistryStore::open_file(&path).expect("opens");
        let names: Vec<&str> = store.registries().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(store.path(), path);
    }

    #[test]
    fn a_list_with_a_login_is_refused_naming_file_registry_and_field_but_not_the_login() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mirrors.json");
        fs::write(
            &path,
            "{\"version\": 1, \"registries\": [{\"name\": \"open\", \"url\": \"https://a.example\", \"priority\": 1}, \
             {\"name\": \"lan\", \"url\": \"https://mirror.lan:5000\", \"priority\": 200, \
             \"auth\": {\"username\": \"node-user-x\", \"password\": \"pw-never-shown\"}}]}",
        )
        .expect("write");
        let err = RegistryStore::open_file(&path)
            .expect("a valid list")
            .refuse_credentials()
            .expect_err("it has a login");
        assert!(
            matches!(&err, StoreError::CredentialsInFile { registry, .. } if registry == "lan"),
            "{err:?}"
        );
        let msg = err.to_string();
        for part in [
            path.display().to_string().as_str(),
            "`lan`",
            "field `auth`",
            "registry add lan https://mirror.lan:5000",
            "--password-stdin",
        ] {
            assert!(msg.contains(part), "missing {part:?} in {msg}");
        }
        for secret in ["pw-never-shown", "node-user-x"] {
            assert!(!msg.contains(secret) && !format!("{err:?}").contains(secret), "{msg}");
        }

        fs::write(
            &path,
            "{\"version\": 1, \"registries\": [{\"name\": \"open\", \"url\": \"https://a.example\", \"priority\": 1}]}",
        )
        .expect("write");
        RegistryStore::open_file(&path)
            .expect("a valid list")
            .refuse_credentials()
            .expect("no login, nothing to refuse");
    }

    #[test]
    fn a_missing_file_is_an_empty_list_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        assert!(store.registries().is_empty());
        assert!(!dir.path().join("config").exists());
    }

    #[test]
    fn added_registries_round_trip_through_the_file_in_priority_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        let creds = Credentials::new("me", "pw").expect("valid");
        store.add(reg("zeta", "https://z.example", 200)).expect("added");
        store
            .add(reg("lan", "http://127.0.0.1:5000", 10).with_credentials(creds.clone()))
            .expect("added");
        store.add(reg("alpha", "https://a.example", 200)).expect("added");

        let again = RegistryStore::open(&DataRoot::new(dir.path())).expect("reopens");
        let names: Vec<&str> = again.registries().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lan", "alpha", "zeta"]);
        assert_eq!(again.registries(), store.registries());
        assert_eq!(again.get("lan").and_then(|r| r.credentials.clone()), Some(creds));
    }

    #[test]
    fn the_file_is_0600_and_the_config_folder_0700() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        store
            .add(reg("a", "https://a.example", 1).with_credentials(Credentials::new("u", "p").expect("valid")))
            .expect("added");
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(&dir.path().join("config")), 0o700);
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path().join("config"))
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [REGISTRIES_FILE]);
    }

    #[test]
    fn a_loose_file_and_folder_are_made_private_on_the_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        fs::create_dir(&config).expect("mkdir");
        fs::set_permissions(&config, Permissions::from_mode(0o755)).expect("chmod");
        let path = config.join(REGISTRIES_FILE);
        fs::write(&path, "{\"version\": 1, \"registries\": []}").expect("write");
        fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        store.add(reg("a", "https://a.example", 1)).expect("added");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&config), 0o700);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_is_left_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = DataRoot::new(dir.path()).registries();
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let text =
            "{\"version\": 1, \"registries\": [{\"name\": \"a\", \"url\": \"http://10.0.0.1\", \"priority\": 1}]}";
        fs::write(&path, text).expect("write");
        let err = RegistryStore::open(&DataRoot::new(dir.path())).expect_err("corrupt");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("registries[0].url"), "{msg}");
        assert!(msg.contains("http://10.0.0.1"), "{msg}");
        assert_eq!(fs::read_to_string(&path).expect("still there"), text);
    }

    #[test]
    fn malformed_json_unknown_fields_versions_and_duplicates_are_corrupt() {
        let cases = [
            ("{\"version\": 1, \"registries\": [", "EOF"),
            ("{\"version\": 1, \"registries\": [], \"extra\": 1}", "unknown field `extra`"),
            ("{\"version\": 2, \"registries\": []}", "version: 2 is not supported"),
            (
                "{\"version\": 1, \"registries\": [{\"name\": \"a\", \"url\": \"https://x\", \"priority\": 1}, {\"name\": \"a\", \"url\": \"https://y\", \"priority\": 2}]}",
                "registries[1].name: `a` is listed twice",
            ),
            (
                "{\"version\": 1, \"registries\": [{\"name\": \"a\", \"url\": \"https://x\", \"priority\": 1}, {\"name\": \"b\", \"url\": \"https://X:443\", \"priority\": 2}]}",
                "registries[1].url: https://x is the same server as registry `a`",
            ),
            (
                "{\"version\": 1, \"registries\": [{\"name\": \"a\", \"url\": \"https://x\", \"priority\": 1, \"auth\": {\"username\": \"u\", \"password\": \"\"}}]}",
                "registries[0].auth: the registry password is empty",
            ),
        ];
        for (text, expected) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = DataRoot::new(dir.path()).registries();
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, text).expect("write");
            let msg = RegistryStore::open(&DataRoot::new(dir.path()))
                .expect_err(text)
                .to_string();
            assert!(msg.contains(expected), "{text}\n=> {msg}");
        }
    }

    #[test]
    fn removing_an_unknown_name_is_a_typed_error_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        store.add(reg("a", "https://a.example", 1)).expect("added");
        let before = fs::read(store.path()).expect("file");
        assert!(matches!(store.remove("nope"), Err(StoreError::UnknownName(n)) if n == "nope"));
        assert_eq!(fs::read(store.path()).expect("file"), before);
        assert_eq!(store.remove("a").expect("removed").name, "a");
        assert!(RegistryStore::open(&DataRoot::new(dir.path()))
            .expect("reopens")
            .registries()
            .is_empty());
    }

    #[test]
    fn duplicate_names_and_servers_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        store.add(reg("a", "https://a.example:5000", 1)).expect("added");
        assert!(matches!(
            store.add(reg("a", "https://b.example", 2)),
            Err(StoreError::DuplicateName(n)) if n == "a"
        ));
        assert!(matches!(
            store.add(reg("b", "https://A.example:5000/", 2)),
            Err(StoreError::DuplicateUrl { existing, .. }) if existing == "a"
        ));
        assert_eq!(store.registries().len(), 1);
    }

    #[test]
    fn the_file_holds_the_credentials_in_the_documented_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
        store
            .add(reg("lan", "https://mirror.lan:5000", 10).with_credentials(Credentials::new("u", "p").expect("valid")))
            .expect("added");
        let json: serde_json::Value = serde_json::from_slice(&fs::read(store.path()).expect("file")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "registries": [{
                    "name": "lan",
                    "url": "https://mirror.lan:5000",
                    "priority": 10,
                    "auth": { "username": "u", "password": "p" }
                }]
            })
        );
    }
}
