//! What is wrong with a manifest, said so that a person can fix it.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One problem in one manifest: the file, the field path (`ports[1].host`),
/// the offending value and what is allowed instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestError {
    pub file: PathBuf,
    /// Line and column (1-based) when the YAML parser knows them.
    pub location: Option<(usize, usize)>,
    /// Dotted field path, `.` for the whole document.
    pub field: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl ManifestError {
    pub fn new(file: impl Into<PathBuf>, field: impl Into<String>, problem: impl Into<String>) -> Self {
        ManifestError {
            file: file.into(),
            location: None,
            field: field.into(),
            value: None,
            problem: problem.into(),
        }
    }

    pub fn with_value(mut self, value: impl fmt::Display) -> Self {
        self.value = Some(value.to_string());
        self
    }

    pub fn at(mut self, location: Option<(usize, usize)>) -> Self {
        self.location = location;
        self
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.location {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": {}", self.field)?;
        if let Some(v) = &self.value {
            write!(f, " = {v:?}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ManifestError {}

/// Collects every problem found in one manifest, so that one mistake never
/// hides the next.
#[derive(Debug)]
pub(crate) struct Problems {
    file: PathBuf,
    pub(crate) errors: Vec<ManifestError>,
}

impl Problems {
    pub(crate) fn new(file: PathBuf) -> Self {
        Problems {
            file,
            errors: Vec::new(),
        }
    }

    /// Records a problem with `field` whose value was `value`.
    pub(crate) fn bad(&mut self, field: impl Into<String>, value: impl fmt::Display, problem: impl Into<String>) {
        self.errors
            .push(ManifestError::new(self.file.clone(), field, problem).with_value(value));
    }

    /// Records a problem that has no single offending value (a missing field).
    pub(crate) fn missing(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ManifestError::new(self.file.clone(), field, problem));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn display_names_file_location_field_value_and_problem() {
        let e = ManifestError::new(
            "apps/electrs/manifest.yml",
            "ports[1].host",
            "allowed: a port number from 1 to 65535",
        )
        .with_value(70000)
        .at(Some((12, 9)));
        assert_eq!(
            e.to_string(),
            "apps/electrs/manifest.yml:12:9: ports[1].host = \"70000\": allowed: a port number from 1 to 65535"
        );
    }

    #[test]
    fn display_leaves_out_what_is_unknown() {
        let e = ManifestError::new("m.yml", "image", "neither `image` nor `build` is set");
        assert_eq!(e.to_string(), "m.yml: image: neither `image` nor `build` is set");
    }

    #[test]
    fn problems_collects_every_error_with_the_file() {
        let mut p = Problems::new(PathBuf::from("a/manifest.yml"));
        p.bad("kind", "daemon", "allowed: service, ui");
        p.missing("image", "missing");
        assert_eq!(p.errors.len(), 2);
        assert_eq!(p.errors[0].value.as_deref(), Some("daemon"));
        assert_eq!(p.errors[1].value, None);
        assert!(p.errors.iter().all(|e| e.file == Path::new("a/manifest.yml")));
    }
}
