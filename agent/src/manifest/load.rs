//! Reading manifests from disk: size and syntax checks before any parsing,
//! then typed parsing with field paths, then validation.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::raw::RawManifest;
use super::validate::{validate, Context};
use super::{set, Manifest, ManifestError};
use crate::dataroot::DataRoot;

/// The file name inside each app folder.
pub const MANIFEST_FILE: &str = "manifest.yml";
/// Larger manifests are refused before parsing.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Absolute volume sources must lie inside an app's folder under this
    /// root (the node's by default).
    pub data_root: DataRoot,
}

/// Every valid app and every error found in a folder of app folders.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// Valid apps, in start order (dependencies first).
    pub apps: Vec<Manifest>,
    pub errors: Vec<ManifestError>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Manifest> {
        self.apps.iter().find(|m| m.id.as_str() == id)
    }
}

/// Loads `<dir>/<id>/manifest.yml` for every sub-folder of `dir`.
///
/// Folders without a manifest are reported too: an app folder whose
/// manifest went missing is a mistake, not a reason to skip it quietly.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> LoadReport {
    let mut report = LoadReport::default();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            report.errors.push(ManifestError::new(
                dir,
                ".",
                format!("cannot read the apps folder: {e}"),
            ));
            return report;
        }
    };
    let mut folders: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) if entry.path().is_dir() => folders.push(entry.path()),
            Ok(_) => {}
            Err(e) => report.errors.push(ManifestError::new(
                dir,
                ".",
                format!("cannot list the apps folder: {e}"),
            )),
        }
    }
    folders.sort();
    let mut valid = Vec::new();
    for folder in folders {
        match load_file(&folder.join(MANIFEST_FILE), opts) {
            Ok(m) => valid.push(m),
            Err(errs) => report.errors.extend(errs),
        }
    }
    let (apps, errors) = set::check_set(valid);
    report.apps = apps;
    report.errors.extend(errors);
    report
}

/// Loads and validates one manifest on its own (no cross-app checks).
pub fn load_file(file: &Path, opts: &LoadOptions) -> Result<Manifest, Vec<ManifestError>> {
    let text = read_limited(file).map_err(|e| vec![e])?;
    let raw = parse(file, &text).map_err(|e| vec![e])?;
    let app_dir = file.parent().unwrap_or(Path::new("."));
    validate(
        raw,
        &Context {
            file,
            app_dir,
            data_root: &opts.data_root,
        },
    )
}

fn read_limited(file: &Path) -> Result<String, ManifestError> {
    let err = |problem: String| ManifestError::new(file, ".", problem);
    let f = fs::File::open(file).map_err(|e| err(format!("cannot open the manifest: {e}")))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so an oversized file is caught without
    // trusting its metadata (it could be a pipe or still growing).
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read the manifest: {e}")))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(err(format!(
            "the manifest is larger than {MAX_MANIFEST_BYTES} bytes; allowed: at most 1 MiB"
        )));
    }
    String::from_utf8(bytes).map_err(|e| err(format!("the manifest is not UTF-8 text: {e}")))
}

/// Parses YAML text into the raw structure with precise error locations.
pub(crate) fn parse(file: &Path, text: &str) -> Result<RawManifest, ManifestError> {
    if let Some((line, col)) = find_tab(text) {
        return Err(
            ManifestError::new(file, ".", "tab character found; allowed: indent with spaces only")
                .at(Some((line, col))),
        );
    }
    if let Some((line, col)) = find_alias(text) {
        return Err(ManifestError::new(
            file,
            ".",
            "YAML anchors and aliases are not allowed in manifests; write the value out",
        )
        .at(Some((line, col))));
    }
    // A first pass into a generic value catches duplicate keys anywhere,
    // including inside maps such as `env` that the typed pass would
    // silently overwrite.
    let value = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(value) => value,
        Err(e) => return Err(yaml_error(file, ".", &e)),
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: RawManifest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        yaml_error(file, &path, e.inner())
    })?;
    // serde_yaml hands a plain scalar such as `0.10` to a string field as
    // written, but YAML (and every other tool) reads it as the number 0.1.
    if value.get("version").is_some_and(|v| !v.is_string()) {
        return Err(ManifestError::new(
            file,
            "version",
            "expected a string, but YAML reads this value as a number, boolean or null; quote it, such as version: \"0.10\"",
        )
        .with_value(&raw.version));
    }
    Ok(raw)
}

fn yaml_error(file: &Path, path: &str, e: &serde_yaml::Error) -> ManifestError {
    let location = e.location().map(|l| (l.line(), l.column()));
    // serde_yaml appends " at line L column C"; the location is printed
    // separately, so strip it to avoid saying it twice.
    let mut msg = e.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    let field = key_field(path, &msg).unwrap_or_else(|| {
        if path.is_empty() {
            ".".to_owned()
        } else {
            path.to_owned()
        }
    });
    ManifestError::new(file, field, msg).at(location)
}

/// serde names a missing or duplicated key only in its message
/// (`ports[0]: missing field `host``, `env: duplicate entry with key "A"`);
/// this puts it in the field path too (`ports[0].host`, `env.A`).
fn key_field(path: &str, msg: &str) -> Option<String> {
    // serde_yaml puts the parent's path, which has no spaces, first.
    let (prefix, rest) = match msg.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') => (Some(prefix), rest),
        _ => (None, msg),
    };
    let (parent, key) = match rest.strip_prefix("missing field `") {
        Some(key) => (path, key.strip_suffix('`')?),
        // The generic first pass has no path of its own: use the prefix.
        None => (
            prefix.unwrap_or(path),
            rest.strip_prefix("duplicate entry with key ")?.trim_matches('"'),
        ),
    };
    Some(match parent {
        "" | "." => key.to_owned(),
        _ => format!("{parent}.{key}"),
    })
}

fn find_tab(text: &str) -> Option<(usize, usize)> {
    text.lines()
        .enumerate()
        .find_map(|(i, line)| line.find('\t').map(|c| (i + 1, line[..c].chars().count() + 1)))
}

/// Finds a YAML alias (`*name`) outside quotes and comments. Aliases are
/// refused outright: a manifest has no use for them, and expanding them is
/// how a small file becomes a huge document.
fn find_alias(text: &str) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (col, ch) in line.chars().enumerate() {
            match (quote, ch) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') if " \t[{,:-".contains(prev) => quote = Some(ch),
                (None, '#') if prev == ' ' || col == 0 => break,
                (None, '*' | '&') if " [{,:-".contains(prev) || col == 0 => {
                    let next = line.chars().nth(col + 1);
                    if next.is_some_and(|n| !n.is_whitespace()) {
                        return Some((i + 1, col + 1));
                    }
                }
                _ => {}
            }
            prev = ch;
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const IMG: &str =
        "docker.io/library/busybox:1.36@sha256:c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    fn manifest(id: &str, extra: &str) -> String {
        format!("id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {IMG}\n{extra}")
    }

    /// Writes `<dir>/<folder>/manifest.yml`.
    fn write_app(dir: &Path, folder: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let file = dir.join(folder).join(MANIFEST_FILE);
        fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        fs::write(&file, text).expect("write manifest");
        file
    }

    /// The one error `parse` gives for `text`.
    fn parse_err(text: &str) -> ManifestError {
        match parse(Path::new("/apps/app/manifest.yml"), text) {
            Ok(raw) => panic!("expected a parse error, got {raw:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn tab_is_located() {
        assert_eq!(find_tab("a: 1\nb:\t2\n"), Some((2, 3)));
        assert_eq!(find_tab("a: 1\n"), None);
    }

    #[test]
    fn aliases_and_anchors_are_found_outside_quotes_and_comments() {
        assert_eq!(find_alias("a: &x 1\n"), Some((1, 4)));
        assert_eq!(find_alias("a: [*x, *x]\n"), Some((1, 5)));
        assert_eq!(find_alias("a: \"*x\"\n"), None);
        assert_eq!(find_alias("a: 1 # see *x\n"), None);
        assert_eq!(find_alias("env: { GLOB: 'a*b' }\n"), None);
        assert_eq!(find_alias("command: [\"--rpcauth=a&b\"]\n"), None);
    }

    #[test]
    fn unknown_top_level_field_is_refused_with_its_path_and_the_known_fields() {
        let e = parse_err(&manifest("app", "restart: always\n"));
        assert_eq!(e.field, "restart");
        assert!(
            e.problem.contains("unknown field `restart`, expected one of `id`"),
            "{e}"
        );
        assert_eq!(e.location, Some((5, 1)));
    }

    #[test]
    fn unknown_nested_fields_are_refused_with_their_paths() {
        let cases = [
            ("ports: [{ host: 1, container: 2, hostt: 3 }]\n", "ports[0].hostt"),
            ("health: { http: { port: 80, pathh: /h } }\n", "health.http.pathh"),
            (
                "volumes: [{ source: a, target: /a, readonly: true }]\n",
                "volumes[0].readonly",
            ),
            ("security: { cap_add: [CHOWN] }\n", "security.cap_add"),
            ("resources: { cpus: 2 }\n", "resources.cpus"),
            ("secrets: [{ name: a, kind: hex16, length: 3 }]\n", "secrets[0].length"),
            ("secret_env: [{ key: A, secret: a, file: x }]\n", "secret_env[0].file"),
        ];
        for (extra, field) in cases {
            let e = parse_err(&manifest("app", extra));
            assert_eq!(e.field, field, "{e}");
            let key = field.rsplit('.').next().expect("key");
            assert!(e.problem.contains(&format!("unknown field `{key}`")), "{e}");
            assert!(e.location.is_some(), "{e}");
        }
    }

    #[test]
    fn container_name_nested_under_an_extension_map_is_an_unknown_field() {
        let e = parse_err(&manifest("app", "extensions:\n  container_name: sneaky\n"));
        assert_eq!(e.field, "extensions");
        assert!(e.problem.contains("unknown field `extensions`"), "{e}");
    }

    #[test]
    fn missing_required_fields_are_named_in_the_field_path() {
        for (text, field) in [
            (format!("name: n\nversion: \"1\"\nimage: {IMG}\n"), "id"),
            (format!("id: app\nversion: \"1\"\nimage: {IMG}\n"), "name"),
            (format!("id: app\nname: n\nimage: {IMG}\n"), "version"),
            (manifest("app", "ports: [{ container: 80 }]\n"), "ports[0].host"),
            (manifest("app", "secrets: [{ name: a }]\n"), "secrets[0].kind"),
        ] {
            let e = parse_err(&text);
            assert_eq!(e.field, field, "{e}");
            let key = field.rsplit('.').next().expect("key");
            assert!(e.problem.contains(&format!("missing field `{key}`")), "{e}");
        }
    }

    #[test]
    fn empty_document_reports_the_missing_id() {
        let e = parse_err("# nothing here\n");
        assert_eq!(e.field, "id");
        assert!(e.problem.contains("missing field `id`"), "{e}");
    }

    #[test]
    fn tabs_are_refused_with_their_location() {
        let e = parse_err(&manifest("app", "env:\n\tA: b\n"));
        assert_eq!(e.field, ".");
        assert!(e.problem.contains("tab character"), "{e}");
        assert!(e.problem.contains("spaces"), "{e}");
        assert_eq!(e.location, Some((6, 1)));
    }

    #[test]
    fn duplicate_top_level_key_is_refused_naming_the_key() {
        let e = parse_err(&manifest("app", "name: again\n"));
        assert_eq!(e.field, "name");
        assert!(e.problem.contains("duplicate entry with key \"name\""), "{e}");
        assert!(e.location.is_some());
    }

    #[test]
    fn duplicate_key_inside_env_is_refused_naming_the_key() {
        let e = parse_err(&manifest("app", "env:\n  LOG: info\n  LOG: debug\n"));
        assert_eq!(e.field, "env.LOG");
        assert!(e.problem.contains("duplicate entry with key \"LOG\""), "{e}");
    }

    #[test]
    fn duplicate_key_inside_a_list_item_is_refused_naming_the_key() {
        let e = parse_err(&manifest("app", "ports: [{ host: 1, host: 2, container: 3 }]\n"));
        assert_eq!(e.field, "ports[0].host");
        assert!(e.problem.contains("duplicate entry"), "{e}");
    }

    #[test]
    fn yaml_anchors_and_aliases_are_refused() {
        for extra in [
            "env: &base { A: b }\n",
            "command: &c [run]\nentrypoint: *c\n",
            "depends_on: [*x]\n",
        ] {
            let e = parse_err(&manifest("app", extra));
            assert_eq!(e.field, ".");
            assert!(e.problem.contains("anchors and aliases are not allowed"), "{e}");
            assert_eq!(e.location.map(|(line, _)| line), Some(5), "{e}");
        }
    }

    #[test]
    fn yaml_syntax_error_gives_line_and_column() {
        let e = parse_err(&manifest("app", "ports: [{ host: 1, container: 2 }\nenv: {}\n"));
        assert_eq!(e.field, ".");
        let (line, column) = e.location.expect("a syntax error has a location");
        assert!(line >= 5, "line {line}");
        assert!(column >= 1);
        // The location is printed once, by Display, not repeated in the message.
        assert!(!e.problem.contains(" at line "), "{e}");
        assert!(e.to_string().contains(&format!(":{line}:{column}: ")), "{e}");
    }

    #[test]
    fn unquoted_numeric_version_is_refused_asking_to_quote_it() {
        let text = format!("id: app\nname: n\nversion: 0.10\nimage: {IMG}\n");
        let e = parse_err(&text);
        assert_eq!(e.field, "version");
        assert_eq!(e.value.as_deref(), Some("0.10"));
        assert!(e.problem.contains("expected a string"), "{e}");
        assert!(e.problem.contains("quote it"), "{e}");
        for bare in ["10", "true", "~"] {
            let e = parse_err(&format!("id: app\nname: n\nversion: {bare}\nimage: {IMG}\n"));
            assert_eq!(e.field, "version", "{bare}: {e}");
        }
        // Unquoted text that YAML reads as a string is fine.
        let raw = parse(Path::new("/x"), &manifest("app", "").replace("\"1.0\"", "1.2.3")).expect("valid");
        assert_eq!(raw.version, "1.2.3");
    }

    #[test]
    fn wrong_type_names_the_field_and_the_expected_type() {
        let e = parse_err(&manifest("app", "ports: [{ host: \"8080\", container: 80 }]\n"));
        assert_eq!(e.field, "ports[0].host");
        assert!(e.problem.contains("invalid type: string \"8080\""), "{e}");
        let e = parse_err(&manifest(
            "app",
            "volumes: [{ source: a, target: /a, read_only: yes }]\n",
        ));
        assert_eq!(e.field, "volumes[0].read_only");
        assert!(e.problem.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn non_utf8_manifest_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut bytes = manifest("app", "").into_bytes();
        bytes.extend_from_slice(b"env: { A: \"\xff\xfe\" }\n");
        let file = write_app(tmp.path(), "app", bytes);
        let errs = load_file(&file, &LoadOptions::default()).expect_err("not UTF-8");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, ".");
        assert_eq!(errs[0].file, file);
        assert!(errs[0].problem.contains("not UTF-8"), "{}", errs[0]);
    }

    #[test]
    fn manifest_over_1_mib_is_refused_before_parsing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Valid YAML on its own: only the size is wrong.
        let mut text = manifest("big", "");
        while (text.len() as u64) <= MAX_MANIFEST_BYTES {
            text.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        let file = write_app(tmp.path(), "big", &text);
        let errs = load_file(&file, &LoadOptions::default()).expect_err("too big");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, ".");
        assert!(errs[0].problem.contains("larger than 1048576 bytes"), "{}", errs[0]);
        assert!(errs[0].problem.contains("at most 1 MiB"), "{}", errs[0]);
    }

    #[test]
    fn manifest_of_exactly_1_mib_is_accepted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut text = manifest("big", "");
        let pad = usize::try_from(MAX_MANIFEST_BYTES).expect("fits") - text.len() - 2;
        text.push('#');
        text.push_str(&" ".repeat(pad));
        text.push('\n');
        assert_eq!(text.len() as u64, MAX_MANIFEST_BYTES);
        let file = write_app(tmp.path(), "big", &text);
        assert!(load_file(&file, &LoadOptions::default()).is_ok());
    }

    #[test]
    fn load_dir_returns_every_valid_app_and_every_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let good_a = write_app(tmp.path(), "alpha", manifest("alpha", ""));
        write_app(tmp.path(), "beta", manifest("beta", "depends_on: [alpha]\n"));
        let bad1 = write_app(tmp.path(), "gamma", manifest("gamma", "kind: daemon\nuser: root\n"));
        let bad2 = write_app(tmp.path(), "delta", "id: delta\n\tname: x\n");
        fs::create_dir(tmp.path().join("empty")).expect("mkdir");
        fs::write(tmp.path().join("README.md"), "not an app").expect("write");

        let report = load_dir(tmp.path(), &LoadOptions::default());
        let ids: Vec<&str> = report.apps.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["alpha", "beta"]);
        assert_eq!(report.get("alpha").map(|m| m.path.clone()), Some(good_a));
        assert!(!report.is_clean());
        let errs: Vec<(&Path, &str)> = report
            .errors
            .iter()
            .map(|e| (e.file.as_path(), e.field.as_str()))
            .collect();
        assert!(errs.contains(&(bad1.as_path(), "kind")), "{errs:?}");
        assert!(errs.contains(&(bad1.as_path(), "user")), "{errs:?}");
        assert!(errs.contains(&(bad2.as_path(), ".")), "{errs:?}");
        let missing = tmp.path().join("empty").join(MANIFEST_FILE);
        let e = report
            .errors
            .iter()
            .find(|e| e.file == missing)
            .expect("folder without a manifest is reported");
        assert!(e.problem.contains("cannot open the manifest"), "{e}");
        assert_eq!(report.errors.len(), 4, "{:#?}", report.errors);
    }

    #[test]
    fn load_dir_on_a_missing_folder_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let report = load_dir(&tmp.path().join("nope"), &LoadOptions::default());
        assert!(report.apps.is_empty());
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].problem.contains("cannot read the apps folder"));
    }

    #[test]
    fn load_dir_uses_the_data_root_from_the_options() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_app(
            tmp.path(),
            "app",
            manifest("app", "volumes: [{ source: /srv/data/app/x, target: /x }]\n"),
        );
        assert!(!load_dir(tmp.path(), &LoadOptions::default()).is_clean());
        let opts = LoadOptions {
            data_root: DataRoot::new("/srv/data"),
        };
        assert!(load_dir(tmp.path(), &opts).is_clean());
    }

    #[test]
    fn key_field_only_trusts_serde_shaped_messages() {
        assert_eq!(key_field(".", "missing field `id`").as_deref(), Some("id"));
        assert_eq!(
            key_field("ports[0]", "ports[0]: missing field `host`").as_deref(),
            Some("ports[0].host")
        );
        assert_eq!(
            key_field(".", "duplicate entry with key \"name\"").as_deref(),
            Some("name")
        );
        assert_eq!(
            key_field(".", "env: duplicate entry with key \"A\"").as_deref(),
            Some("env.A")
        );
        // A value that merely quotes the words is left alone.
        assert_eq!(
            key_field(
                "env.A",
                "env.A: invalid type: string \"duplicate entry with key x\", expected a string"
            ),
            None
        );
        assert_eq!(key_field("name", "invalid value: missing field `x` here"), None);
    }
}
