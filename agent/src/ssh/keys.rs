//! OpenSSH public keys as `authorized_keys` lines, pure: parsing, the
//! checks a key must pass before it may log in to the node, and its
//! SHA256 fingerprint exactly as `ssh-keygen -l` prints it.
//!
//! A line is `TYPE BASE64 [COMMENT]`. Accepted: the key types OpenSSH 9.2
//! (Debian 12) accepts by default, ed25519, ECDSA (nistp256/384/521), their
//! FIDO (`sk-`) forms, and RSA of at least 2048 bits. Refused, each with
//! its reason: options before the key (`from=`, `command=`,
//! `restrict`, …: the node writes plain keys only, and cannot vouch that
//! a restriction would mean what its writer meant once merged), DSA
//! (OpenSSH refuses it), certificates, a blob that is not valid base64 or
//! whose inner type differs from the written one, and control characters
//! in the comment. Blank lines and `#` comments are no keys but are kept.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// The key types accepted, as written in a line, with the name
/// `ssh-keygen -l` gives them.
pub const KEY_TYPES: [(&str, &str); 7] = [
    ("ssh-ed25519", "ED25519"),
    ("sk-ssh-ed25519@openssh.com", "ED25519-SK"),
    ("ecdsa-sha2-nistp256", "ECDSA"),
    ("ecdsa-sha2-nistp384", "ECDSA"),
    ("ecdsa-sha2-nistp521", "ECDSA"),
    ("sk-ecdsa-sha2-nistp256@openssh.com", "ECDSA-SK"),
    ("ssh-rsa", "RSA"),
];
/// The smallest RSA key accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// A line longer than this is no public key (a 16384-bit RSA key's line
/// is about 2.8 KiB).
pub const MAX_LINE: usize = 8 * 1024;

/// What a line may be, for error messages.
fn allowed() -> String {
    let types: Vec<&str> = KEY_TYPES.iter().map(|(t, _)| *t).collect();
    format!(
        "allowed: one public key per line, `TYPE BASE64 [COMMENT]` as in a .pub file, TYPE one of {} \
         (RSA of at least {MIN_RSA_BITS} bits), no options",
        types.join(", ")
    )
}

/// Why a line is not a key the node accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the line is empty; {}", allowed())]
    Empty,
    #[error("the line is {len} bytes long, more than any public key ({MAX_LINE} at most)")]
    TooLong { len: usize },
    #[error(
        "{first:?} is not a key type: options before the key (from=, command=, restrict, …) are not accepted; {}",
        allowed()
    )]
    Options { first: String },
    #[error(
        "{kind:?} keys are not accepted (OpenSSH 9.2 refuses DSA, and certificates are not plain keys); {}",
        allowed()
    )]
    Refused { kind: String },
    #[error("{kind:?} is not a key type; {}", allowed())]
    UnknownType { kind: String },
    #[error("the {kind} key has no key data after its type; {}", allowed())]
    NoKeyData { kind: String },
    #[error("the key data is not base64 ({detail})")]
    BadBase64 { detail: String },
    #[error("the key data is a {inner:?} key but the line says {kind:?}")]
    TypeMismatch { kind: String, inner: String },
    #[error("the {kind} key data is malformed: {why}")]
    Malformed { kind: String, why: String },
    #[error("the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required")]
    WeakRsa { bits: usize },
    #[error("the comment holds a control character ({found:?}); comments are printable text")]
    ControlInComment { found: char },
}

/// One accepted public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: &'static str,
    label: &'static str,
    blob: Vec<u8>,
    comment: String,
}

impl PublicKey {
    /// Parses one line (no trailing newline needed). Blank lines and
    /// comments are [`KeyError::Empty`] here; see [`parse_line`].
    pub fn parse(line: &str) -> Result<PublicKey, KeyError> {
        if line.len() > MAX_LINE {
            return Err(KeyError::TooLong { len: line.len() });
        }
        let line = line.trim();
        // Words apart by runs of spaces and tabs, as OpenSSH reads them;
        // the comment is the rest of the line.
        let mut words = split_word(line);
        let kind = words.next().filter(|w| !w.is_empty()).ok_or(KeyError::Empty)?;
        let Some(&(kind, label)) = KEY_TYPES.iter().find(|(t, _)| *t == kind) else {
            return Err(classify_unknown(kind));
        };
        let rest = words.next().unwrap_or("");
        let mut words = split_word(rest);
        let data = words
            .next()
            .filter(|w| !w.is_empty())
            .ok_or(KeyError::NoKeyData { kind: kind.to_owned() })?;
        let comment = words.next().unwrap_or("").trim().to_owned();
        if let Some(found) = comment.chars().find(|c| c.is_control()) {
            return Err(KeyError::ControlInComment { found });
        }
        let blob = STANDARD
            .decode(data)
            .map_err(|e| KeyError::BadBase64 { detail: e.to_string() })?;
        check_blob(kind, &blob)?;
        Ok(PublicKey {
            kind,
            label,
            blob,
            comment,
        })
    }

    /// `SHA256:…`, the fingerprint `ssh-keygen -l` prints.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&self.blob)))
    }

    /// The key type as written (`ssh-ed25519`).
    pub fn kind(&self) -> &str {
        self.kind
    }

    /// The key type as `ssh-keygen -l` names it (`ED25519`).
    pub fn label(&self) -> &str {
        self.label
    }

    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// Whether `other` is the same key (whatever its comment).
    pub fn same_key(&self, other: &PublicKey) -> bool {
        self.kind == other.kind && self.blob == other.blob
    }

    /// The line as written to `authorized_keys`.
    pub fn line(&self) -> String {
        let data = STANDARD.encode(&self.blob);
        if self.comment.is_empty() {
            format!("{} {data}", self.kind)
        } else {
            format!("{} {data} {}", self.kind, self.comment)
        }
    }
}

/// `SHA256:… (ED25519) comment`: what the node shows of a key. Never the
/// key data itself.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.fingerprint(), self.label)?;
        if !self.comment.is_empty() {
            write!(f, " {}", self.comment)?;
        }
        Ok(())
    }
}

fn classify_unknown(first: &str) -> KeyError {
    let refused = ["ssh-dss", "ssh-dsa"];
    if refused.contains(&first) || first.contains("-cert-v01@openssh.com") {
        return KeyError::Refused { kind: first.to_owned() };
    }
    // What authorized_keys(5) options look like: a word of letters with
    // `=`, `"` or `,` (command="…",no-pty), or a bare option name.
    let bare = [
        "restrict",
        "cert-authority",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-user-rc",
        "no-X11-forwarding",
        "agent-forwarding",
        "port-forwarding",
        "pty",
        "user-rc",
        "X11-forwarding",
        "no-touch-required",
        "verify-required",
    ];
    if first.contains(['=', '"', ',']) || bare.contains(&first) {
        // Show the options' names, not their values (a command may hold
        // anything).
        let names: Vec<&str> = first
            .split(',')
            .map(|o| o.split('=').next().unwrap_or(o))
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .collect();
        return KeyError::Options {
            first: if names.is_empty() {
                "(options)".to_owned()
            } else {
                names.join(",")
            },
        };
    }
    KeyError::UnknownType {
        kind: first.chars().take(64).collect(),
    }
}

/// The SSH wire format's `string`s, read in order.
struct Wire<'b> {
    rest: &'b [u8],
}

impl<'b> Wire<'b> {
    fn string(&mut self) -> Option<&'b [u8]> {
        let len = u32::from_be_bytes(self.rest.get(..4)?.try_into().ok()?) as usize;
        let value = self.rest.get(4..4 + len)?;
        self.rest = &self.rest[4 + len..];
        Some(value)
    }
}

/// The blob is a key of the written type, well formed, and every byte of
/// it is read.
fn check_blob(kind: &str, blob: &[u8]) -> Result<(), KeyError> {
    let malformed = |why: &str| KeyError::Malformed {
        kind: kind.to_owned(),
        why: why.to_owned(),
    };
    let mut wire = Wire { rest: blob };
    let inner = wire.string().ok_or_else(|| malformed("no type inside"))?;
    if inner != kind.as_bytes() {
        return Err(KeyError::TypeMismatch {
            kind: kind.to_owned(),
            inner: String::from_utf8_lossy(inner).chars().take(64).collect(),
        });
    }
    fn field<'b>(wire: &mut Wire<'b>, kind: &str, what: &str) -> Result<&'b [u8], KeyError> {
        wire.string().ok_or_else(|| KeyError::Malformed {
            kind: kind.to_owned(),
            why: format!("no {what}"),
        })
    }
    match kind {
        "ssh-ed25519" | "sk-ssh-ed25519@openssh.com" => {
            if field(&mut wire, kind, "public key")?.len() != 32 {
                return Err(malformed("an ed25519 public key is 32 bytes"));
            }
            if kind.starts_with("sk-") {
                field(&mut wire, kind, "application")?;
            }
        }
        "ssh-rsa" => {
            field(&mut wire, kind, "exponent")?;
            let modulus = field(&mut wire, kind, "modulus")?;
            let bits = mpint_bits(modulus);
            if bits < MIN_RSA_BITS {
                return Err(KeyError::WeakRsa { bits });
            }
        }
        _ => {
            // ECDSA: the curve's name is the type's tail.
            let curve = field(&mut wire, kind, "curve")?;
            let expected = kind
                .trim_end_matches("@openssh.com")
                .rsplit('-')
                .next()
                .unwrap_or_default();
            if curve != expected.as_bytes() {
                return Err(malformed(&format!("its curve is not {expected}")));
            }
            if field(&mut wire, kind, "point")?.first() != Some(&0x04) {
                return Err(malformed("the point is not an uncompressed curve point"));
            }
            if kind.starts_with("sk-") {
                field(&mut wire, kind, "application")?;
            }
        }
    }
    if !wire.rest.is_empty() {
        return Err(malformed(&format!("{} bytes after the key", wire.rest.len())));
    }
    Ok(())
}

/// The bit length of an SSH `mpint` (big-endian, maybe a leading zero).
fn mpint_bits(bytes: &[u8]) -> usize {
    let Some(at) = bytes.iter().position(|&b| b != 0) else {
        return 0;
    };
    (bytes.len() - at - 1) * 8 + (8 - bytes[at].leading_zeros() as usize)
}

/// The first word of `text` (already trimmed at its start) and the rest
/// after the spaces and tabs that follow it.
fn split_word(text: &str) -> impl Iterator<Item = &str> {
    let (word, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
    [word, rest.trim_start_matches([' ', '\t'])].into_iter()
}

/// One line of an `authorized_keys` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A key.
    Key(PublicKey),
    /// A blank line or a `#` comment, kept as written.
    Other(String),
}

/// Parses one line of an `authorized_keys` file.
pub fn parse_line(line: &str) -> Result<Line, KeyError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        if let Some(found) = line.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(KeyError::ControlInComment { found });
        }
        return Ok(Line::Other(line.trim_end().to_owned()));
    }
    PublicKey::parse(line).map(Line::Key)
}

/// A line that is not accepted: its number (1-based) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub number: usize,
    pub error: KeyError,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.number, self.error)
    }
}

/// Every line of `text`, in order, with its number: the accepted ones and
/// the refused ones apart.
pub fn parse_text(text: &str) -> (Vec<(usize, Line)>, Vec<BadLine>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    // A carriage return before the newline (a file from Windows) is no
    // part of the line.
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match parse_line(line) {
            Ok(l) => good.push((i + 1, l)),
            Err(error) => bad.push(BadLine { number: i + 1, error }),
        }
    }
    (good, bad)
}

/// A fingerprint as the owner may type it: `SHA256:…` or the bare hash.
pub fn normalize_fingerprint(given: &str) -> String {
    let given = given.trim();
    match given.strip_prefix("SHA256:") {
        Some(_) => given.to_owned(),
        None => format!("SHA256:{given}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `ssh-keygen -t ed25519 -C test@archy`, and its `ssh-keygen -lf` output.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICTIZDkT/58mJaqMOlNmdMOsOEJb3r4bCjuTHsZfsLdS test@archy";
    const ED25519_FP: &str = "SHA256:B/pmf/v5gtu6CxRQX93H3/aUKC9JN1hkL6dD2nDoa+Y";

    fn blob(parts: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&u32::try_from(p.len()).unwrap().to_be_bytes());
            out.extend_from_slice(p);
        }
        STANDARD.encode(out)
    }

    #[test]
    fn an_ed25519_key_parses_with_the_fingerprint_ssh_keygen_prints() {
        let key = PublicKey::parse(ED25519).unwrap();
        assert_eq!(key.kind(), "ssh-ed25519");
        assert_eq!(key.label(), "ED25519");
        assert_eq!(key.comment(), "test@archy");
        assert_eq!(key.fingerprint(), ED25519_FP);
        assert_eq!(key.line(), ED25519);
        assert_eq!(key.to_string(), format!("{ED25519_FP} (ED25519) test@archy"));
        // Tabs, extra spaces and a comment with spaces.
        let spaced = ED25519
            .replacen(' ', "\t", 1)
            .replace("test@archy", " the owner's laptop ");
        let key = PublicKey::parse(&spaced).unwrap();
        assert_eq!(key.comment(), "the owner's laptop");
        assert_eq!(key.fingerprint(), ED25519_FP);
        let bare = PublicKey::parse(&ED25519.replace(" test@archy", "")).unwrap();
        assert!(bare.same_key(&key));
        assert_eq!(bare.line(), ED25519.replace(" test@archy", ""));
        // Runs of spaces between the words, as a paste may bring (OpenSSH
        // skips them too): the key, written back one space apart.
        let wide = format!("  {}  ", ED25519.replace(' ', "   "));
        assert_eq!(PublicKey::parse(&wide).unwrap().line(), ED25519);
    }

    #[test]
    fn options_dsa_certificates_and_unknown_types_are_refused_saying_why() {
        let with_options = format!("command=\"rm -rf /\",no-pty {ED25519}");
        let e = PublicKey::parse(&with_options).unwrap_err();
        assert_eq!(
            e,
            KeyError::Options {
                first: "command".into()
            }
        );
        assert!(e.to_string().contains("no options"), "{e}");
        assert!(!e.to_string().contains("rm -rf"), "option values are not echoed: {e}");
        assert_eq!(
            PublicKey::parse(&format!("restrict {ED25519}")).unwrap_err(),
            KeyError::Options {
                first: "restrict".into()
            }
        );
        assert_eq!(
            PublicKey::parse("ssh-dss AAAAB3NzaC1kc3MAAACBAP").unwrap_err(),
            KeyError::Refused { kind: "ssh-dss".into() }
        );
        assert!(matches!(
            PublicKey::parse("ssh-ed25519-cert-v01@openssh.com AAAA").unwrap_err(),
            KeyError::Refused { .. }
        ));
        let e = PublicKey::parse("hello world").unwrap_err();
        assert_eq!(e, KeyError::UnknownType { kind: "hello".into() });
        assert!(e.to_string().contains("ssh-ed25519, sk-ssh-ed25519@openssh.com"), "{e}");
        assert_eq!(
            PublicKey::parse("ssh-ed25519").unwrap_err(),
            KeyError::NoKeyData {
                kind: "ssh-ed25519".into()
            }
        );
    }

    #[test]
    fn key_data_must_be_base64_of_a_key_of_the_written_type() {
        assert!(matches!(
            PublicKey::parse("ssh-ed25519 not*base64").unwrap_err(),
            KeyError::BadBase64 { .. }
        ));
        // An ed25519 blob written as RSA.
        let data = ED25519.split(' ').nth(1).unwrap();
        assert_eq!(
            PublicKey::parse(&format!("ssh-rsa {data}")).unwrap_err(),
            KeyError::TypeMismatch {
                kind: "ssh-rsa".into(),
                inner: "ssh-ed25519".into()
            }
        );
        // Truncated, too short a key, trailing bytes.
        let cut = blob(&[b"ssh-ed25519"]);
        assert!(matches!(
            PublicKey::parse(&format!("ssh-ed25519 {cut}")).unwrap_err(),
            KeyError::Malformed { .. }
        ));
        let short = blob(&[b"ssh-ed25519", &[7u8; 31]]);
        assert!(matches!(
            PublicKey::parse(&format!("ssh-ed25519 {short}")).unwrap_err(),
            KeyError::Malformed { .. }
        ));
        let trailing = blob(&[b"ssh-ed25519", &[7u8; 32], b"x"]);
        let e = PublicKey::parse(&format!("ssh-ed25519 {trailing}")).unwrap_err();
        assert!(e.to_string().contains("5 bytes after the key"), "{e}");
        let ok = blob(&[b"ssh-ed25519", &[7u8; 32]]);
        assert!(PublicKey::parse(&format!("ssh-ed25519 {ok}")).is_ok());
        let control = format!("ssh-ed25519 {ok} evil\u{1b}[2J");
        assert_eq!(
            PublicKey::parse(&control).unwrap_err(),
            KeyError::ControlInComment { found: '\u{1b}' }
        );
    }

    #[test]
    fn rsa_needs_2048_bits_and_ecdsa_its_own_curve() {
        let modulus = |bits: usize| {
            let mut n = vec![0u8];
            n.push(0x80);
            n.extend(std::iter::repeat_n(0xffu8, bits / 8 - 1));
            n
        };
        let rsa = |bits| format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &modulus(bits)]));
        assert_eq!(
            PublicKey::parse(&rsa(1024)).unwrap_err(),
            KeyError::WeakRsa { bits: 1024 }
        );
        assert_eq!(PublicKey::parse(&rsa(2048)).unwrap().label(), "RSA");
        assert_eq!(mpint_bits(&[0, 0x01, 0]), 9);
        assert_eq!(mpint_bits(&[]), 0);
        let point = [&[4u8][..], &[9u8; 64]].concat();
        let p256 = blob(&[b"ecdsa-sha2-nistp256", b"nistp256", &point]);
        assert_eq!(
            PublicKey::parse(&format!("ecdsa-sha2-nistp256 {p256}"))
                .unwrap()
                .label(),
            "ECDSA"
        );
        let wrong = blob(&[b"ecdsa-sha2-nistp256", b"nistp384", &point]);
        assert!(matches!(
            PublicKey::parse(&format!("ecdsa-sha2-nistp256 {wrong}")).unwrap_err(),
            KeyError::Malformed { .. }
        ));
        let sk = blob(&[b"sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", &point, b"ssh:"]);
        assert_eq!(
            PublicKey::parse(&format!("sk-ecdsa-sha2-nistp256@openssh.com {sk}"))
                .unwrap()
                .label(),
            "ECDSA-SK"
        );
    }

    #[test]
    fn a_file_keeps_comments_and_numbers_its_bad_lines() {
        let text = format!("# the owner's keys\r\n{ED25519}\r\n\nssh-dss AAAA\nfrom=\"10.0.0.1\" {ED25519}\n");
        let (good, bad) = parse_text(&text);
        assert_eq!(good.len(), 3);
        assert_eq!(good[0], (1, Line::Other("# the owner's keys".into())));
        assert!(matches!(&good[1], (2, Line::Key(k)) if k.fingerprint() == ED25519_FP));
        assert_eq!(good[2], (3, Line::Other(String::new())));
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].number, 4);
        assert!(
            bad[0]
                .to_string()
                .starts_with("line 4: \"ssh-dss\" keys are not accepted"),
            "{}",
            bad[0]
        );
        assert_eq!(bad[1].number, 5);
        assert_eq!(bad[1].error, KeyError::Options { first: "from".into() });
        assert!(matches!(
            PublicKey::parse(&"x".repeat(MAX_LINE + 1)).unwrap_err(),
            KeyError::TooLong { .. }
        ));
    }

    #[test]
    fn fingerprints_are_taken_with_or_without_their_prefix() {
        assert_eq!(normalize_fingerprint(" abc "), "SHA256:abc");
        assert_eq!(normalize_fingerprint("SHA256:abc"), "SHA256:abc");
    }
}
