//! Reading manifests from disk: size and syntax checks before any parsing,
//! then typed parsing with field paths, then validation.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::raw::RawManifest;
use super::validate::{validate, Context};
use super::{set, Manifest, ManifestError, DEFAULT_DATA_ROOT};

/// The file name inside each app folder.
pub const MANIFEST_FILE: &str = "manifest.yml";
/// Larger manifests are refused before parsing.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Absolute volume sources must lie inside this folder.
    pub data_root: PathBuf,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            data_root: PathBuf::from(DEFAULT_DATA_ROOT),
        }
    }
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
    if let Err(e) = serde_yaml::from_str::<serde_yaml::Value>(text) {
        return Err(yaml_error(file, ".", &e));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        yaml_error(file, &path, e.inner())
    })
}

fn yaml_error(file: &Path, path: &str, e: &serde_yaml::Error) -> ManifestError {
    let location = e.location().map(|l| (l.line(), l.column()));
    // serde_yaml appends " at line L column C"; the location is printed
    // separately, so strip it to avoid saying it twice.
    let mut msg = e.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    ManifestError::new(file, if path.is_empty() { "." } else { path }, msg).at(location)
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
mod tests {
    use super::*;

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
}
