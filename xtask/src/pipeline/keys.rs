//! The release signing key: what signs the update bundle and `SHA256SUMS`,
//! and whose certificate the image trusts as its RAUC keyring
//! (`/etc/rauc/keyring.pem`).
//!
//! A release build passes its key with `--sign-key`/`--sign-cert` (or
//! `ARCHY_SIGN_KEY`/`ARCHY_SIGN_CERT`). Without them a development key
//! pair is made once under `target/keys/` and used, and the build says so:
//! an image built with it trusts only bundles signed with that key, which
//! is what development and the tests need and never what a release wants.
//!
//! Certificates are valid from 1970: a node whose clock is wrong (a dead
//! RTC battery, no network yet) must still accept a valid bundle. RAUC
//! checks validity at the bundle's signing time on the node
//! (`use-bundle-signing-time`), so this is a second line only; the dates
//! are checked here anyway. OpenSSL 3.0's `req -x509` cannot set a start
//! date, so the development certificate is self-signed with `openssl ca
//! -selfsign -startdate` and a minimal CA configuration in a temporary
//! folder.
//!
//! The key's bytes are never read here, printed or logged: only paths are
//! passed to `openssl` and `rauc`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::harness::procs::capture;
use crate::pipeline::flags::{self, ReleaseArgs};
use crate::pipeline::progress;

/// Under the target folder.
pub const DEV_KEYS_SUBDIR: &str = "keys";
pub const DEV_KEY_FILE: &str = "archipelago-dev.key.pem";
pub const DEV_CERT_FILE: &str = "archipelago-dev.cert.pem";
/// The subject of a development certificate.
pub const DEV_SUBJECT_CN: &str = "Archipelago development signing key (not for releases)";
/// Certificates start at the Unix epoch (`openssl ca -startdate`) and
/// end in 2099.
pub const CERT_START: &str = "19700101000000Z";
pub const CERT_END: &str = "20991231235959Z";
/// The latest a certificate may start: a node with a dead RTC boots into
/// 2000 or earlier.
pub const LATEST_START: CertTime = CertTime {
    year: 2000,
    month: 1,
    day: 1,
    hour: 0,
    minute: 0,
    second: 0,
};

/// A key pair that signs releases: the private key (a PEM file, 0600) and
/// its X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// Made by the build under target/keys/, not given by the caller.
    pub development: bool,
}

impl SigningKey {
    /// The key the build signs with: the one `args` names (checked), else
    /// the development key under `target/keys/` (made now if missing).
    /// Says which in a progress line.
    pub fn resolve(root: &Path, sh: &Shell, args: &ReleaseArgs) -> anyhow::Result<SigningKey> {
        let key = match (&args.sign_key, &args.sign_cert) {
            (Some(key), Some(cert)) => {
                let key = SigningKey {
                    key: key.clone(),
                    cert: cert.clone(),
                    development: false,
                };
                key.check(sh)?;
                progress::say(
                    "keys",
                    &format!("signing with the release key whose certificate is {}", cert.display()),
                );
                key
            }
            (None, None) => {
                let dir = flags::target_dir(root).join(DEV_KEYS_SUBDIR);
                let (key, made) = development(sh, &dir)?;
                progress::say(
                    "keys",
                    &format!(
                        "no --sign-key/--sign-cert (ARCHY_SIGN_KEY/ARCHY_SIGN_CERT): signing with the development key {} ({}), \
                         for development only: the image trusts only bundles signed with it",
                        key.cert.display(),
                        if made { "made now" } else { "made before" }
                    ),
                );
                key
            }
            _ => bail!(
                "--sign-key and --sign-cert (ARCHY_SIGN_KEY and ARCHY_SIGN_CERT) go together: give both or neither"
            ),
        };
        Ok(key)
    }

    /// The key is a private key readable by its owner only, the
    /// certificate parses, belongs to the key, and starts no later than
    /// [`LATEST_START`].
    pub fn check(&self, sh: &Shell) -> anyhow::Result<()> {
        let meta = fs::metadata(&self.key).with_context(|| format!("the signing key {}", self.key.display()))?;
        if !meta.is_file() {
            bail!("the signing key {} is not a regular file", self.key.display());
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "the signing key {} has mode {mode:04o}: others may read it; allowed: 0600 or 0400 (chmod 600 {})",
                self.key.display(),
                self.key.display()
            );
        }
        let key = &self.key;
        let cert = &self.cert;
        // Public halves only: the key's bytes never reach the output.
        let from_key = capture(cmd!(sh, "openssl pkey -in {key} -pubout").quiet()).with_context(|| {
            format!(
                "the signing key {} is not a PEM private key openssl can read",
                key.display()
            )
        })?;
        let from_cert = capture(cmd!(sh, "openssl x509 -in {cert} -noout -pubkey").quiet())
            .with_context(|| format!("the certificate {} is not a PEM X.509 certificate", cert.display()))?;
        if from_key.trim() != from_cert.trim() {
            bail!(
                "the certificate {} does not belong to the signing key {}: their public keys differ",
                cert.display(),
                key.display()
            );
        }
        let dates = cert_dates(sh, cert)?;
        if dates.not_before > LATEST_START {
            bail!(
                "the certificate {} starts {}; allowed: 2000-01-01 or earlier, so a node whose clock \
                 reset accepts its bundles (README: Releases and signing keys)",
                cert.display(),
                dates.not_before
            );
        }
        Ok(())
    }
}

/// `sig`: a detached CMS signature (PEM) of `file` with the key, as
/// `openssl cms -verify -binary -content FILE -in SIG -inform PEM -CAfile
/// CERT` checks it (README). Detached is `openssl cms -sign`'s default.
pub fn sign_detached(sh: &Shell, key: &SigningKey, file: &Path, sig: &Path) -> anyhow::Result<()> {
    let (key_file, cert) = (&key.key, &key.cert);
    capture(
        cmd!(
            sh,
            "openssl cms -sign -binary -in {file} -signer {cert} -inkey {key_file} -outform PEM -out {sig}"
        )
        .quiet(),
    )
    .with_context(|| format!("signing {} (openssl cms -sign)", file.display()))?;
    Ok(())
}

/// Checks a detached signature [`sign_detached`] made, with `cert` as the
/// only trusted certificate.
pub fn verify_detached(sh: &Shell, cert: &Path, file: &Path, sig: &Path) -> anyhow::Result<()> {
    capture(
        cmd!(
            sh,
            "openssl cms -verify -binary -content {file} -in {sig} -inform PEM -CAfile {cert} -purpose any -out /dev/null"
        )
        .quiet(),
    )
    .with_context(|| format!("the signature {} of {} does not verify with {}", sig.display(), file.display(), cert.display()))?;
    Ok(())
}

/// The development key pair in `dir`, made once: `(key, made now)`.
/// Two builds making it at once both end up with the same pair (the first
/// rename wins).
pub fn development(sh: &Shell, dir: &Path) -> anyhow::Result<(SigningKey, bool)> {
    let key = SigningKey {
        key: dir.join(DEV_KEY_FILE),
        cert: dir.join(DEV_CERT_FILE),
        development: true,
    };
    if dir.exists() {
        key.check(sh).with_context(|| {
            format!(
                "the development key in {} (remove the folder to make a new one)",
                dir.display()
            )
        })?;
        return Ok((key, false));
    }
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent folder", dir.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".keys-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", staging.path().display()))?;
    generate(sh, staging.path(), DEV_SUBJECT_CN)?;
    let staged = staging.keep();
    match fs::rename(&staged, dir) {
        Ok(()) => Ok((key, true)),
        Err(_) if dir.exists() => {
            // Another build made it first: use theirs.
            let _ = fs::remove_dir_all(&staged);
            key.check(sh)?;
            Ok((key, false))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staged);
            Err(e).with_context(|| format!("moving the development key into {}", dir.display()))
        }
    }
}

/// A new key pair in `dir` (which must exist): an EC P-256 key, 0600, and
/// a self-signed certificate for `common_name` valid from [`CERT_START`]
/// to [`CERT_END`]. Tests make a second, unrelated pair with it.
pub fn generate(sh: &Shell, dir: &Path, common_name: &str) -> anyhow::Result<SigningKey> {
    let key = SigningKey {
        key: dir.join(DEV_KEY_FILE),
        cert: dir.join(DEV_CERT_FILE),
        development: true,
    };
    let key_path = &key.key;
    // Created 0600 before openssl writes a byte into it.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    capture(
        cmd!(
            sh,
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {key_path}"
        )
        .quiet(),
    )
    .context("making the signing key (openssl genpkey)")?;
    fs::set_permissions(key_path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", key_path.display()))?;

    let ca = tempfile::tempdir().context("creating a temporary folder for openssl ca")?;
    let ca_dir = ca.path();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(ca_dir.join("certs"))
        .context("creating openssl ca's folder")?;
    fs::write(ca_dir.join("index.txt"), "").context("writing openssl ca's index")?;
    // Required by the configuration; -rand_serial picks the serial.
    fs::write(ca_dir.join("serial"), "01\n").context("writing openssl ca's serial")?;
    let config = ca_dir.join("ca.cnf");
    fs::write(&config, ca_config(ca_dir, common_name)).context("writing openssl ca's configuration")?;
    let request = ca_dir.join("request.pem");
    capture(cmd!(sh, "openssl req -new -config {config} -key {key_path} -out {request}").quiet())
        .context("making the certificate request (openssl req)")?;
    let cert = &key.cert;
    capture(
        cmd!(
            sh,
            "openssl ca -batch -config {config} -selfsign -keyfile {key_path} -in {request} -out {cert} -notext -rand_serial -startdate {CERT_START} -enddate {CERT_END}"
        )
        .quiet(),
    )
    .context("self-signing the certificate (openssl ca -selfsign)")?;
    key.check(sh)?;
    Ok(key)
}

/// A minimal `openssl ca` configuration: self-signing only, the subject
/// from the request, a CA certificate that may sign code and certificates.
fn ca_config(dir: &Path, common_name: &str) -> String {
    format!(
        "[ca]\n\
         default_ca = archy\n\
         [archy]\n\
         dir = {dir}\n\
         database = $dir/index.txt\n\
         new_certs_dir = $dir/certs\n\
         serial = $dir/serial\n\
         default_md = sha256\n\
         policy = any_subject\n\
         unique_subject = no\n\
         email_in_dn = no\n\
         copy_extensions = none\n\
         x509_extensions = signing\n\
         [any_subject]\n\
         commonName = supplied\n\
         organizationName = optional\n\
         [req]\n\
         distinguished_name = subject\n\
         prompt = no\n\
         [subject]\n\
         CN = {common_name}\n\
         O = Archipelago\n\
         [signing]\n\
         basicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,digitalSignature,keyCertSign\n\
         subjectKeyIdentifier = hash\n",
        dir = dir.display()
    )
}

/// A certificate's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertDates {
    pub not_before: CertTime,
    pub not_after: CertTime,
}

/// A UTC time as `openssl x509 -dates` prints it, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CertTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl std::fmt::Display for CertTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// `openssl x509 -noout -dates` of `cert`.
pub fn cert_dates(sh: &Shell, cert: &Path) -> anyhow::Result<CertDates> {
    let out = capture(cmd!(sh, "openssl x509 -in {cert} -noout -dates").quiet())
        .with_context(|| format!("reading the dates of the certificate {}", cert.display()))?;
    parse_dates(&out).with_context(|| format!("the dates of the certificate {}", cert.display()))
}

/// `notBefore=Jan  1 00:00:00 1970 GMT` and `notAfter=…` lines.
pub fn parse_dates(text: &str) -> anyhow::Result<CertDates> {
    let field = |name: &str| -> anyhow::Result<CertTime> {
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("openssl printed no {name}: {text:?}"))?;
        parse_time(value)
    };
    Ok(CertDates {
        not_before: field("notBefore")?,
        not_after: field("notAfter")?,
    })
}

/// `Jan  1 00:00:00 1970 GMT`.
pub fn parse_time(value: &str) -> anyhow::Result<CertTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let bad = || format!("{value:?} is not a time as openssl prints it (e.g. \"Jan  1 00:00:00 1970 GMT\")");
    let words: Vec<&str> = value.split_whitespace().collect();
    let [month, day, time, year, "GMT"] = words.as_slice() else {
        bail!(bad());
    };
    let month = MONTHS.iter().position(|m| m == month).with_context(bad)?;
    let hms: Vec<&str> = time.split(':').collect();
    let [hour, minute, second] = hms.as_slice() else {
        bail!(bad());
    };
    let num = |s: &str| s.parse::<u32>().with_context(bad);
    Ok(CertTime {
        year: num(year)?,
        month: u32::try_from(month).with_context(bad)? + 1,
        day: num(day)?,
        hour: num(hour)?,
        minute: num(minute)?,
        second: num(second)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openssl_dates_are_read_and_ordered() {
        let dates = parse_dates("notBefore=Jan  1 00:00:00 1970 GMT\nnotAfter=Dec 31 23:59:59 2099 GMT\n").unwrap();
        assert_eq!(dates.not_before.to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(dates.not_after.to_string(), "2099-12-31T23:59:59Z");
        assert!(dates.not_before <= LATEST_START);
        let later = parse_time("Jan  1 00:00:01 2000 GMT").unwrap();
        assert!(later > LATEST_START);
        assert_eq!(parse_time("Jan  1 00:00:00 2000 GMT").unwrap(), LATEST_START);
        for bad in [
            "",
            "Foo 1 00:00:00 2000 GMT",
            "Jan 1 00:00 2000 GMT",
            "Jan 1 00:00:00 2000 CET",
        ] {
            let e = parse_time(bad).unwrap_err().to_string();
            assert!(e.contains("not a time as openssl prints it"), "{e}");
        }
        let e = parse_dates("notBefore=Jan  1 00:00:00 1970 GMT\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no notAfter"), "{e}");
    }
}
