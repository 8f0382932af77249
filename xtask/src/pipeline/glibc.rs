//! Which glibc a binary needs, read from its ELF symbol versions
//! (`.gnu.version_r`), and whether a rootfs's glibc is new enough.
//!
//! A binary linked against a newer glibc than the node has fails at start
//! with "version `GLIBC_2.xx' not found": that is what broke every Debian 12
//! node when a binary from a Debian 13 build host was copied in. The check
//! reads the ELF file itself, so it needs no host tool.

use std::cmp::Ordering;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context as _};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
const SECTION_HEADER_SIZE: usize = 64;
const VERNEED_SIZE: usize = 16;
const VERNAUX_SIZE: usize = 16;
/// Versions that are not numbers but stand for one: the relative
/// relocation ABI marker exists since glibc 2.36.
const NAMED_VERSIONS: &[(&str, &str)] = &[("GLIBC_ABI_DT_RELR", "2.36")];

/// A glibc version such as 2.36 or 2.2.5, compared number by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlibcVersion(Vec<u32>);

impl GlibcVersion {
    pub fn parse(s: &str) -> Option<GlibcVersion> {
        let parts: Option<Vec<u32>> = s.split('.').map(|p| p.parse().ok()).collect();
        parts.filter(|p| p.len() >= 2).map(GlibcVersion)
    }

    /// The upstream version in a Debian libc6 version: `2.36-9+deb12u13`
    /// is 2.36.
    pub fn from_debian(version: &str) -> Option<GlibcVersion> {
        let no_epoch = version.split_once(':').map_or(version, |(_, v)| v);
        let upstream = no_epoch.split_once('-').map_or(no_epoch, |(u, _)| u);
        GlibcVersion::parse(upstream)
    }
}

impl Ord for GlibcVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        (0..len)
            .map(|i| self.0.get(i).unwrap_or(&0).cmp(other.0.get(i).unwrap_or(&0)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for GlibcVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// The `GLIBC_*` version names a binary requires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// Every `GLIBC_*` name, in file order.
    pub names: Vec<String>,
}

impl Needs {
    /// The highest version required, or None for a binary that needs no
    /// versioned glibc symbol (static, or not linked to glibc).
    pub fn newest(&self) -> anyhow::Result<Option<GlibcVersion>> {
        let mut newest: Option<GlibcVersion> = None;
        for name in &self.names {
            let version = match NAMED_VERSIONS.iter().find(|(n, _)| n == name) {
                Some((_, v)) => GlibcVersion::parse(v),
                None => name.strip_prefix("GLIBC_").and_then(GlibcVersion::parse),
            };
            let Some(version) = version else {
                bail!("the binary needs glibc's {name}, which no released glibc provides to programs");
            };
            if newest.as_ref().is_none_or(|n| version > *n) {
                newest = Some(version);
            }
        }
        Ok(newest)
    }
}

/// Reads the version needs of an ELF file.
pub fn needs_of_file(path: &Path) -> anyhow::Result<Needs> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    needs_of(&bytes).with_context(|| format!("reading the ELF symbol versions of {}", path.display()))
}

/// Refuses a binary that needs a newer glibc than `available`.
pub fn check(binary: &Path, needs: &Needs, available: &GlibcVersion, available_from: &str) -> anyhow::Result<()> {
    let Some(newest) = needs.newest()? else {
        return Ok(());
    };
    if newest > *available {
        let too_new: Vec<&str> = needs
            .names
            .iter()
            .filter(|n| {
                n.strip_prefix("GLIBC_")
                    .and_then(GlibcVersion::parse)
                    .is_some_and(|v| v > *available)
            })
            .map(String::as_str)
            .collect();
        bail!(
            "refusing to embed {}: it needs glibc {newest} (symbol versions {}) but the rootfs ships glibc {available} \
             ({available_from}), so it would not start on the node; build it on Debian 12 (bookworm) or against glibc {available} or older",
            binary.display(),
            too_new.join(", ")
        );
    }
    Ok(())
}

fn needs_of(bytes: &[u8]) -> anyhow::Result<Needs> {
    if bytes.get(..4) != Some(ELF_MAGIC) {
        bail!("not an ELF file");
    }
    if bytes.get(4) != Some(&ELFCLASS64) || bytes.get(5) != Some(&ELFDATA2LSB) {
        bail!("not a 64-bit little-endian ELF file (the rootfs is amd64)");
    }
    let r = Reader(bytes);
    let shoff = usize::try_from(r.u64(0x28)?).context("section header offset too large")?;
    let shentsize = usize::from(r.u16(0x3a)?);
    let shnum = usize::from(r.u16(0x3c)?);
    if shnum == 0 {
        return Ok(Needs::default());
    }
    if shentsize != SECTION_HEADER_SIZE {
        bail!("unexpected section header size {shentsize}");
    }
    let section = |index: usize| -> anyhow::Result<(u32, usize, usize, usize, usize)> {
        let at = shoff + index * SECTION_HEADER_SIZE;
        Ok((
            r.u32(at + 4)?,
            usize::try_from(r.u64(at + 24)?)?,
            usize::try_from(r.u64(at + 32)?)?,
            usize::try_from(r.u32(at + 40)?)?,
            usize::try_from(r.u32(at + 44)?)?,
        ))
    };
    let mut names = Vec::new();
    for index in 0..shnum {
        let (kind, offset, _size, link, count) = section(index)?;
        if kind != SHT_GNU_VERNEED {
            continue;
        }
        let (_, strtab, strsize, _, _) = section(link)?;
        let string = |at: u32| r.cstr(strtab, strsize, at as usize);
        let mut need = offset;
        for _ in 0..count {
            let aux_count = r.u16(need + 2)?;
            let mut aux = need + r.u32(need + 8)? as usize;
            for _ in 0..aux_count {
                let name = string(r.u32(aux + 8)?)?;
                // libc.so.6, libm.so.6, libpthread.so.0…: all glibc.
                if name.starts_with("GLIBC_") {
                    names.push(name.to_owned());
                }
                let next = r.u32(aux + 12)? as usize;
                if next == 0 {
                    break;
                }
                aux += next.max(VERNAUX_SIZE);
            }
            let next = r.u32(need + 12)? as usize;
            if next == 0 {
                break;
            }
            need += next.max(VERNEED_SIZE);
        }
    }
    Ok(Needs { names })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> anyhow::Result<[u8; N]> {
        self.0
            .get(at..at + N)
            .and_then(|s| s.try_into().ok())
            .with_context(|| format!("the file ends before offset {}", at + N))
    }

    fn u16(&self, at: usize) -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(at)?))
    }

    fn u32(&self, at: usize) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(at)?))
    }

    fn u64(&self, at: usize) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(at)?))
    }

    fn cstr(&self, table: usize, size: usize, at: usize) -> anyhow::Result<&str> {
        let table = self
            .0
            .get(table..table + size)
            .context("the string table lies outside the file")?;
        let rest = table.get(at..).context("a string lies outside the string table")?;
        let end = rest.iter().position(|b| *b == 0).context("an unterminated string")?;
        std::str::from_utf8(&rest[..end]).context("a version name that is not UTF-8")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v(s: &str) -> GlibcVersion {
        GlibcVersion::parse(s).unwrap()
    }

    #[test]
    fn versions_compare_number_by_number() {
        assert!(v("2.36") > v("2.4"));
        assert!(v("2.2.5") < v("2.3"));
        assert!(v("2.2.5") > v("2.2"));
        assert_eq!(v("2.36"), v("2.36"));
        assert_eq!(v("2.36").cmp(&v("2.36.0")), Ordering::Equal);
        assert_eq!(GlibcVersion::from_debian("2.36-9+deb12u13").unwrap(), v("2.36"));
        assert_eq!(GlibcVersion::from_debian("1:2.41-6").unwrap(), v("2.41"));
        assert!(GlibcVersion::parse("PRIVATE").is_none());
    }

    #[test]
    fn reads_the_glibc_needs_of_a_real_binary() {
        // This test binary is linked against the host's glibc.
        let exe = std::env::current_exe().unwrap();
        let needs = needs_of_file(&exe).unwrap();
        assert!(needs.names.iter().any(|n| n == "GLIBC_2.2.5"), "{needs:?}");
        let newest = needs.newest().unwrap().unwrap();
        assert!(newest >= v("2.17"), "{newest}");
    }

    #[test]
    fn a_binary_for_a_newer_glibc_is_refused_with_the_reason() {
        let exe = std::env::current_exe().unwrap();
        let mut bytes = std::fs::read(&exe).unwrap();
        // Turn the binary's GLIBC_2.2.5 need into GLIBC_9.2.5, as a build
        // against a future glibc would have it.
        let at = bytes.windows(12).position(|w| w == b"GLIBC_2.2.5\0").unwrap();
        bytes[at + 6] = b'9';
        let needs = needs_of(&bytes).unwrap();
        assert!(needs.names.iter().any(|n| n == "GLIBC_9.2.5"), "{needs:?}");

        let err = check(Path::new("archy-agent"), &needs, &v("2.36"), "libc6 2.36-9+deb12u13").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("needs glibc 9.2.5"), "{msg}");
        assert!(msg.contains("GLIBC_9.2.5"), "{msg}");
        assert!(msg.contains("ships glibc 2.36"), "{msg}");

        let real = needs_of_file(&exe).unwrap();
        let host = real.newest().unwrap().unwrap();
        check(Path::new("x"), &real, &host, "the host").unwrap();
    }

    #[test]
    fn private_and_marker_versions() {
        let needs = Needs {
            names: vec!["GLIBC_2.2.5".into(), "GLIBC_ABI_DT_RELR".into()],
        };
        assert_eq!(needs.newest().unwrap().unwrap(), v("2.36"));
        let private = Needs {
            names: vec!["GLIBC_PRIVATE".into()],
        };
        assert!(private.newest().is_err());
        assert!(Needs::default().newest().unwrap().is_none());
    }

    #[test]
    fn non_elf_input_is_an_error() {
        assert!(needs_of(b"#!/bin/sh\n").is_err());
        assert!(needs_of(b"\x7fELF").is_err());
    }
}
