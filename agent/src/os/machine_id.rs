//! The node's machine-id: made once at a fresh install, kept on the data
//! partition (`<data>/system/machine-id`), and given to systemd on every
//! boot by `grub.cfg` (`systemd.machine_id=`), so the node keeps its DHCP
//! client id, and with it its address, across boots and reinstalls.

use std::fmt;

/// 32 lower-case hex digits, not all zero (systemd's format).
#[derive(Clone, PartialEq, Eq)]
pub struct MachineId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a machine-id; allowed: 32 lower-case hex digits, not all zero")]
pub struct BadMachineId {
    pub value: String,
}

impl MachineId {
    /// Parses a machine-id file's contents (one line, trailing newline
    /// allowed).
    pub fn parse(text: &str) -> Result<MachineId, BadMachineId> {
        let id = text.strip_suffix('\n').unwrap_or(text);
        let ok = id.len() == 32
            && id.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            && id.chars().any(|c| c != '0');
        if ok {
            Ok(MachineId(id.to_owned()))
        } else {
            Err(BadMachineId {
                // Never a whole file in a message.
                value: text.chars().take(64).collect(),
            })
        }
    }

    /// A new random id from the kernel's generator, marked as a random
    /// (version 4) UUID as systemd does.
    pub fn random() -> anyhow::Result<MachineId> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot read random bytes: {e}"))?;
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(MachineId(hex))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file's bytes: the id and a newline.
    pub fn file_bytes(&self) -> Vec<u8> {
        format!("{}\n", self.0).into_bytes()
    }
}

impl fmt::Debug for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachineId({})", self.0)
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_parse_back_and_differ() {
        let a = MachineId::random().unwrap();
        let b = MachineId::random().unwrap();
        assert_ne!(a, b);
        let text = String::from_utf8(a.file_bytes()).unwrap();
        assert_eq!(MachineId::parse(&text).unwrap(), a);
        assert_eq!(a.as_str().len(), 32);
    }

    #[test]
    fn only_32_lower_hex_digits_not_all_zero() {
        assert!(MachineId::parse("0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "0123456789ABCDEF0123456789ABCDEF",
            "00000000000000000000000000000000",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef\n\n",
            "uninitialized\n",
        ] {
            let e = MachineId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("32 lower-case hex"), "{e}");
        }
    }
}
