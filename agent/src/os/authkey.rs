//! An SSH public key as an `authorized_keys` line, checked before the
//! installer writes it (pure): a known key type, its base64 blob, and the
//! blob's own type name equal to the line's. Options before the type
//! (`from=…`) are refused: a key the installer writes grants plain login.

/// The key types OpenSSH's server in Debian 12 accepts by default.
pub const KEY_TYPES: [&str; 6] = [
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    #[error("{what}: the key type is {found:?}; allowed: {}", KEY_TYPES.join(", "))]
    Type { what: String, found: String },
    #[error("{what}: the {kind} key has no base64 data after its type")]
    NoBlob { what: String, kind: String },
    #[error("{what}: the {kind} key's data is not base64")]
    NotBase64 { what: String, kind: String },
    #[error("{what}: the key's data is a {inner:?} key, the line says {kind:?}")]
    TypeMismatch { what: String, kind: String, inner: String },
}

/// Checks one line (`what` names it in errors: a file and line number, or
/// "the pasted key") and returns it normalised: type, blob, comment, one
/// space apart.
pub fn check_line(line: &str, what: &str) -> Result<String, BadKey> {
    let mut words = line.split_whitespace();
    let kind = words.next().unwrap_or("");
    if !KEY_TYPES.contains(&kind) {
        return Err(BadKey::Type {
            what: what.to_owned(),
            found: kind.chars().take(40).collect(),
        });
    }
    let Some(blob) = words.next() else {
        return Err(BadKey::NoBlob {
            what: what.to_owned(),
            kind: kind.to_owned(),
        });
    };
    let Some(bytes) = decode_base64(blob) else {
        return Err(BadKey::NotBase64 {
            what: what.to_owned(),
            kind: kind.to_owned(),
        });
    };
    // The blob starts with its type as an SSH string (u32 length, bytes).
    let inner = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|len| bytes.get(4..4 + len))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .unwrap_or_default();
    if inner != kind {
        return Err(BadKey::TypeMismatch {
            what: what.to_owned(),
            kind: kind.to_owned(),
            inner: inner.chars().take(40).collect(),
        });
    }
    let comment: Vec<&str> = words.collect();
    let mut out = format!("{kind} {blob}");
    if !comment.is_empty() {
        out.push(' ');
        out.push_str(&comment.join(" "));
    }
    Ok(out)
}

/// Checks every key of an `authorized_keys` file's text (blank lines and
/// `#` comments skipped); `file` names it in errors with the line number.
pub fn check_file(text: &str, file: &str) -> Result<Vec<String>, BadKey> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| check_line(l, &format!("{file} line {}", i + 1)))
        .collect()
}

/// Standard base64 with padding, as OpenSSH writes keys.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.chunks(4);
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // ssh-keygen -t ed25519 (a throwaway key).
    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0uuTaaPauXcmjuorxd6ozbeGxPgKdbBm9W1fjQMifX owner@laptop";

    #[test]
    fn a_real_key_passes_normalised() {
        let line = format!("  {}  ", ED.replace(' ', "   "));
        assert_eq!(check_line(&line, "the pasted key").unwrap(), ED);
        let text = format!("# mine\n\n{ED}\n");
        assert_eq!(
            check_file(&text, "ARCHY-CONF/authorized_keys").unwrap(),
            vec![ED.to_owned()]
        );
    }

    #[test]
    fn bad_keys_say_what_and_where() {
        let e = check_line("ssh-dss AAAA", "the pasted key").unwrap_err();
        assert!(
            e.to_string().contains("\"ssh-dss\"") && e.to_string().contains("ssh-ed25519"),
            "{e}"
        );
        let e = check_line("from=\"10.0.0.1\" ssh-ed25519 AAAA", "k").unwrap_err();
        assert!(matches!(e, BadKey::Type { .. }), "{e}");
        assert!(matches!(check_line("ssh-ed25519", "k"), Err(BadKey::NoBlob { .. })));
        assert!(matches!(
            check_line("ssh-ed25519 not*base64", "k"),
            Err(BadKey::NotBase64 { .. })
        ));
        // An ed25519 blob labelled as RSA.
        let lying = ED.replace("ssh-ed25519 ", "ssh-rsa ");
        let e = check_line(&lying, "k").unwrap_err();
        assert!(matches!(e, BadKey::TypeMismatch { .. }), "{e}");
        let e = check_file(&format!("{ED}\nssh-ed25519 AAAA=\n"), "/conf/authorized_keys").unwrap_err();
        assert!(e.to_string().starts_with("/conf/authorized_keys line 2:"), "{e}");
    }

    #[test]
    fn base64_decodes_with_padding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGV5").unwrap(), b"hey");
        assert!(decode_base64("aGk").is_none());
        assert!(decode_base64("a=Gk").is_none());
        assert!(decode_base64("").is_none());
    }
}
