//! The release's software bill of materials: `sbom.spdx.json`, an SPDX 2.3
//! JSON document written by `cargo xtask iso` next to the ISO and listed in
//! `SHA256SUMS`.
//!
//! It is made from the build report's own data ([`Report`]), so the SBOM
//! and `build-report.json` cannot disagree: one package for the release
//! (the ISO, with its sha256), one per installed Debian package (name,
//! version, `pkg:deb/debian/<name>@<version>?arch=<arch>&distro=debian-12`)
//! and one per pre-pulled app image (`pkg:oci/<name>@sha256:…?repository_url=…`),
//! the release CONTAINS each of them, the document DESCRIBES the release.
//! Scanners (grype, trivy, Dependency-Track) match on those purls.
//!
//! Reproducible like the ISO: everything is sorted, `created` is the
//! build's epoch (`SOURCE_DATE_EPOCH`), and the `documentNamespace` is
//! derived from the release's name and the document's own content, so the
//! same inputs give the same bytes. [`render`] is pure; [`write`] writes it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::pipeline::report::{ImageRecord, Package, Report};

pub const SBOM_FILE: &str = "sbom.spdx.json";
/// The Debian release the packages come from, as purl's `distro` qualifier.
pub const DEB_DISTRO: &str = "debian-12";
const DOCUMENT_ID: &str = "SPDXRef-DOCUMENT";
const RELEASE_ID: &str = "SPDXRef-Package-release";
const NOASSERTION: &str = "NOASSERTION";

/// The SBOM file as written: its name in the output folder and its sha256,
/// for `SHA256SUMS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub file: String,
    pub sha256: String,
}

impl Written {
    /// Its line in `SHA256SUMS` (`sha256sum` format; `iso::write_sums` makes
    /// the file now, signed, from the name and sha256).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn sums_line(&self) -> String {
        format!("{}  {}\n", self.sha256, self.file)
    }
}

/// Percent-encodes a purl component: unreserved characters and `:` stay
/// (purl leaves the colon of a Debian epoch or a digest as it is), `/` too
/// when `keep_slash` (a `repository_url` value); everything else, `+`
/// included, becomes `%XX`.
pub fn purl_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let c = char::from(b);
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '~' | ':') || (keep_slash && c == '/') {
            out.push(c);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `pkg:deb/debian/<name>@<version>?arch=<arch>&distro=debian-12`.
pub fn deb_purl(p: &Package) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={}&distro={DEB_DISTRO}",
        purl_encode(&p.name, false),
        purl_encode(&p.version, false),
        purl_encode(&p.arch, false)
    )
}

/// An image reference split for its purl: the repository (registry and
/// path, no tag), the tag if any, and the digest it is pinned by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
}

impl OciRef {
    /// From the report's record: the reference's own digest (for a
    /// multi-platform image, the index's, which is what a pull names), else
    /// the manifest digest (a locally built app image).
    pub fn of(image: &ImageRecord) -> anyhow::Result<OciRef> {
        let (name_tag, digest) = match image.reference.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => (image.reference.as_str(), image.manifest_digest.clone()),
        };
        if !digest.starts_with("sha256:") || digest.len() <= "sha256:".len() {
            bail!(
                "build report: image of app {}: digest {digest:?} (from reference {:?}) is not sha256:<hex>",
                image.app,
                image.reference
            );
        }
        // A tag is after the last ':' that follows the last '/' (a
        // registry's port comes before the first '/').
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                name_tag[..last_slash + i].to_string(),
                Some(name_tag[last_slash + i + 1..].to_string()),
            ),
            None => (name_tag.to_string(), None),
        };
        if repository.is_empty() || repository.ends_with('/') {
            bail!(
                "build report: image of app {}: reference {:?} names no repository",
                image.app,
                image.reference
            );
        }
        Ok(OciRef {
            repository,
            tag,
            digest,
        })
    }

    /// The image's name: the repository's last path component, lower case.
    pub fn name(&self) -> String {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
            .to_ascii_lowercase()
    }

    /// `pkg:oci/<name>@sha256:…?repository_url=<registry/path>[&tag=<tag>]`.
    pub fn purl(&self) -> String {
        let mut purl = format!(
            "pkg:oci/{}@{}?repository_url={}",
            purl_encode(&self.name(), false),
            purl_encode(&self.digest, false),
            purl_encode(&self.repository, true)
        );
        if let Some(tag) = &self.tag {
            purl.push_str("&tag=");
            purl.push_str(&purl_encode(tag, false));
        }
        purl
    }
}

/// An SPDXID from a prefix, an index (unique) and a name, with every
/// character SPDX does not allow (`[A-Za-z0-9.-]` only) made `-`.
fn spdx_id(kind: &str, index: usize, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("SPDXRef-Package-{kind}-{index}-{clean}")
}

fn purl_ref(purl: String) -> Value {
    json!([{
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": purl,
    }])
}

/// The SPDX 2.3 document for `report`, stamped `created` at `epoch_seconds`
/// (the build's `SOURCE_DATE_EPOCH`). Pure.
pub fn render(report: &Report, epoch_seconds: u64) -> anyhow::Result<Value> {
    let created = crate::pipeline::flags::rfc3339(epoch_seconds)?;
    let doc_name = format!("{}-{}-{}", report.product, report.version, report.arch);

    let mut release = json!({
        "SPDXID": RELEASE_ID,
        "name": report.product,
        "versionInfo": report.version,
        "supplier": format!("Organization: {}", report.product),
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": false,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "comment": format!("Debian {} ({}) for {}", report.release, DEB_DISTRO, report.arch),
    });
    if let Some(artifact) = &report.artifact {
        release["packageFileName"] = json!(artifact.file);
        release["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": artifact.sha256 }]);
    }

    let mut packages = vec![release];
    let mut relationships = vec![json!({
        "spdxElementId": DOCUMENT_ID,
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": RELEASE_ID,
    })];
    let mut contains = |id: &str| {
        relationships.push(json!({
            "spdxElementId": RELEASE_ID,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    };

    let mut debs: Vec<&Package> = report.packages.iter().collect();
    debs.sort();
    debs.dedup();
    for (i, p) in debs.iter().enumerate() {
        if p.name.is_empty() || p.version.is_empty() {
            bail!(
                "build report: package #{i} has name {:?} and version {:?}; both must be set",
                p.name,
                p.version
            );
        }
        let id = spdx_id("deb", i + 1, &p.name);
        packages.push(json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": NOASSERTION,
            "filesAnalyzed": false,
            "licenseConcluded": NOASSERTION,
            "licenseDeclared": NOASSERTION,
            "copyrightText": NOASSERTION,
            "comment": format!("Debian package, architecture {}", p.arch),
            "externalRefs": purl_ref(deb_purl(p)),
        }));
        contains(&id);
    }

    let mut images: Vec<&ImageRecord> = report.images.iter().collect();
    images.sort_by(|a, b| (&a.app, &a.reference).cmp(&(&b.app, &b.reference)));
    for (i, image) in images.iter().enumerate() {
        let oci = OciRef::of(image)?;
        let id = spdx_id("oci", i + 1, &image.app);
        packages.push(json!({
            "SPDXID": id,
            "name": oci.name(),
            "versionInfo": oci.tag.clone().unwrap_or_else(|| oci.digest.clone()),
            "downloadLocation": NOASSERTION,
            "filesAnalyzed": false,
            "primaryPackagePurpose": "CONTAINER",
            "licenseConcluded": NOASSERTION,
            "licenseDeclared": NOASSERTION,
            "copyrightText": NOASSERTION,
            "comment": format!(
                "image of app {}: {}; platform manifest {}, config (image ID) {}, archive sha256 {}",
                image.app, image.reference, image.manifest_digest, image.config_digest, image.archive_sha256
            ),
            "externalRefs": purl_ref(oci.purl()),
        }));
        contains(&id);
    }

    // The namespace names this document uniquely and reproducibly: the
    // release's name plus a hash of everything else in it.
    let body = json!({ "created": created, "packages": packages, "relationships": relationships });
    let digest = hex(&Sha256::digest(
        serde_json::to_vec(&body).context("serialising the SBOM")?,
    ));
    let namespace = format!("https://spdx.org/spdxdocs/{doc_name}-{}", &digest[..32]);

    Ok(json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": DOCUMENT_ID,
        "name": doc_name,
        "documentNamespace": namespace,
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: archipelago-xtask-{}", crate::pipeline::flags::VERSION)],
        },
        "documentDescribes": [RELEASE_ID],
        "packages": body["packages"],
        "relationships": body["relationships"],
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Renders the SBOM and writes it as `out/sbom.spdx.json` (pretty JSON, a
/// final newline); its name and sha256 for `SHA256SUMS`.
pub fn write(report: &Report, epoch_seconds: u64, out: &Path) -> anyhow::Result<Written> {
    let doc = render(report, epoch_seconds)?;
    let text = serde_json::to_string_pretty(&doc).context("serialising the SBOM")? + "\n";
    let path = out.join(SBOM_FILE);
    std::fs::write(&path, &text).with_context(|| format!("writing the SBOM {}", path.display()))?;
    Ok(Written {
        file: SBOM_FILE.into(),
        sha256: hex(&Sha256::digest(text.as_bytes())),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::pipeline::report::tests::sample;

    const EPOCH: u64 = 1_700_000_000;

    fn report() -> Report {
        let mut r = sample();
        r.packages = vec![
            Package {
                name: "podman".into(),
                version: "4.3.1+ds1-8+deb12u1".into(),
                arch: "amd64".into(),
            },
            Package {
                name: "libstdc++6".into(),
                version: "12.2.0-14".into(),
                arch: "amd64".into(),
            },
            Package {
                name: "bsdutils".into(),
                version: "1:2.38.1-5+b1".into(),
                arch: "amd64".into(),
            },
        ];
        r.images.push(ImageRecord {
            app: "ui".into(),
            reference: "localhost/archipelago/ui:0f3a".into(),
            manifest_digest: format!("sha256:{}", "dd".repeat(32)),
            config_digest: format!("sha256:{}", "dd".repeat(32)),
            archive_sha256: "ee".repeat(32),
            size: 9,
        });
        r
    }

    fn packages(doc: &Value) -> &Vec<Value> {
        doc["packages"].as_array().unwrap()
    }

    fn purl_of(p: &Value) -> &str {
        p["externalRefs"][0]["referenceLocator"].as_str().unwrap()
    }

    #[test]
    fn the_document_has_the_spdx_2_3_fields() {
        let doc = render(&report(), EPOCH).unwrap();
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["dataLicense"], "CC0-1.0");
        assert_eq!(doc["SPDXID"], "SPDXRef-DOCUMENT");
        assert_eq!(doc["name"], "archipelago-0.1.0-amd64");
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert!(doc["creationInfo"]["creators"][0]
            .as_str()
            .unwrap()
            .starts_with("Tool: "));
        let ns = doc["documentNamespace"].as_str().unwrap();
        assert!(
            ns.starts_with("https://spdx.org/spdxdocs/archipelago-0.1.0-amd64-"),
            "{ns}"
        );
        assert!(!ns.contains('#'), "a namespace may not hold '#': {ns}");
    }

    #[test]
    fn every_package_has_a_unique_id_and_a_purl_and_the_release_contains_them() {
        let doc = render(&report(), EPOCH).unwrap();
        let pkgs = packages(&doc);
        // The release, 3 Debian packages, 2 images.
        assert_eq!(pkgs.len(), 6);
        let ids: BTreeSet<&str> = pkgs.iter().map(|p| p["SPDXID"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), pkgs.len(), "SPDXIDs are unique: {ids:?}");
        for id in &ids {
            assert!(id.starts_with("SPDXRef-"), "{id}");
            assert!(
                id["SPDXRef-".len()..]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
                "{id} has characters SPDX does not allow"
            );
        }
        for p in &pkgs[1..] {
            assert_eq!(p["externalRefs"][0]["referenceCategory"], "PACKAGE-MANAGER");
            assert_eq!(p["externalRefs"][0]["referenceType"], "purl");
            for field in ["name", "versionInfo", "downloadLocation"] {
                assert!(p[field].is_string(), "{field} missing in {p}");
            }
            assert_eq!(p["filesAnalyzed"], false);
        }
        let rels = doc["relationships"].as_array().unwrap();
        let describes: Vec<&Value> = rels.iter().filter(|r| r["relationshipType"] == "DESCRIBES").collect();
        assert_eq!(describes.len(), 1);
        assert_eq!(describes[0]["spdxElementId"], "SPDXRef-DOCUMENT");
        assert_eq!(describes[0]["relatedSpdxElement"], pkgs[0]["SPDXID"]);
        let contained: BTreeSet<&str> = rels
            .iter()
            .filter(|r| r["relationshipType"] == "CONTAINS")
            .map(|r| r["relatedSpdxElement"].as_str().unwrap())
            .collect();
        assert_eq!(contained.len(), 5);
        assert!(!contained.contains(pkgs[0]["SPDXID"].as_str().unwrap()));
        // Every relationship names elements that exist.
        for r in rels {
            for end in ["spdxElementId", "relatedSpdxElement"] {
                let id = r[end].as_str().unwrap();
                assert!(id == "SPDXRef-DOCUMENT" || ids.contains(id), "{id}");
            }
        }
        assert_eq!(pkgs[0]["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(pkgs[0]["checksums"][0]["checksumValue"], "ab".repeat(32));
        assert_eq!(pkgs[0]["packageFileName"], "archipelago-0.1.0-amd64.iso");
    }

    #[test]
    fn debian_packages_are_sorted_with_encoded_purls() {
        let doc = render(&report(), EPOCH).unwrap();
        let debs: Vec<(&str, &str)> = packages(&doc)[1..4]
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), purl_of(p)))
            .collect();
        assert_eq!(
            debs,
            [
                (
                    "bsdutils",
                    "pkg:deb/debian/bsdutils@1:2.38.1-5%2Bb1?arch=amd64&distro=debian-12"
                ),
                (
                    "libstdc++6",
                    "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14?arch=amd64&distro=debian-12"
                ),
                (
                    "podman",
                    "pkg:deb/debian/podman@4.3.1%2Bds1-8%2Bdeb12u1?arch=amd64&distro=debian-12"
                ),
            ]
        );
        assert_eq!(packages(&doc)[3]["versionInfo"], "4.3.1+ds1-8+deb12u1");
    }

    #[test]
    fn images_carry_their_digest_repository_and_tag() {
        let doc = render(&report(), EPOCH).unwrap();
        let electrs = &packages(&doc)[4];
        assert_eq!(electrs["name"], "electrs");
        assert_eq!(electrs["versionInfo"], "v0.10.10");
        assert_eq!(electrs["primaryPackagePurpose"], "CONTAINER");
        assert_eq!(
            purl_of(electrs),
            "pkg:oci/electrs@sha256:c991?repository_url=docker.io/getumbrel/electrs&tag=v0.10.10"
        );
        let ui = &packages(&doc)[5];
        assert_eq!(
            purl_of(ui),
            format!(
                "pkg:oci/ui@sha256:{}?repository_url=localhost/archipelago/ui&tag=0f3a",
                "dd".repeat(32)
            )
        );
    }

    #[test]
    fn references_split_into_repository_tag_and_digest() {
        let mut image = sample().images[0].clone();
        image.reference = "registry.example:5000/a/b@sha256:12".into();
        let oci = OciRef::of(&image).unwrap();
        assert_eq!(oci.repository, "registry.example:5000/a/b");
        assert_eq!(oci.tag, None);
        assert_eq!(oci.digest, "sha256:12");
        assert_eq!(
            oci.purl(),
            "pkg:oci/b@sha256:12?repository_url=registry.example:5000/a/b"
        );
        image.reference = "docker.io/x/y:1.0".into();
        image.manifest_digest = "md5:00".into();
        let err = OciRef::of(&image).unwrap_err();
        assert!(format!("{err}").contains("is not sha256:<hex>"), "{err}");
    }

    #[test]
    fn the_same_report_gives_the_same_bytes_and_another_a_new_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(&report(), EPOCH, dir.path()).unwrap();
        let first = std::fs::read(dir.path().join(SBOM_FILE)).unwrap();
        let b = write(&report(), EPOCH, dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(first, std::fs::read(dir.path().join(SBOM_FILE)).unwrap());
        assert_eq!(a.sha256, hex(&Sha256::digest(&first)));
        assert_eq!(a.sums_line(), format!("{}  sbom.spdx.json\n", a.sha256));
        assert!(first.ends_with(b"}\n"));

        let mut other = report();
        other.packages[0].version.push('1');
        let ns = |d: &Value| d["documentNamespace"].as_str().unwrap().to_string();
        assert_ne!(
            ns(&render(&report(), EPOCH).unwrap()),
            ns(&render(&other, EPOCH).unwrap())
        );
        assert_ne!(
            ns(&render(&report(), EPOCH).unwrap()),
            ns(&render(&report(), EPOCH + 1).unwrap())
        );
    }

    /// The document through a real SPDX validator: spdx-tools' `pyspdxtools`
    /// from PyPI (installed into target/spdx-tools when missing).
    #[test]
    fn pyspdxtools_validates_the_document() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let tool = crate::harness::pytool::PyTool {
            name: "spdx-tools",
            requirements: SPDX_TOOLS_REQUIREMENTS,
            bin: "pyspdxtools",
        }
        .ensure(root)
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(&report(), EPOCH, dir.path()).unwrap();
        let out = std::process::Command::new(&tool)
            .arg("-i")
            .arg(dir.path().join(SBOM_FILE))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pyspdxtools refused the SBOM:\n{text}");
        assert!(!text.contains("invalid"), "{text}");

        // And it does refuse a broken one, so the pass above means something.
        let mut broken = render(&report(), EPOCH).unwrap();
        broken["packages"][1]["SPDXID"] = json!("not an spdx id");
        let bad = dir.path().join("broken.spdx.json");
        std::fs::write(&bad, serde_json::to_string(&broken).unwrap()).unwrap();
        let out = std::process::Command::new(&tool).arg("-i").arg(&bad).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && text.contains("The document is invalid") && text.contains("not an spdx id"),
            "pyspdxtools should refuse a package with SPDXID \"not an spdx id\" ({}):\n{text}",
            out.status
        );
    }

    /// spdx-tools and its dependencies at the versions this was checked with
    /// (versions pinned, no hashes: the set is a dozen pure-Python wheels).
    const SPDX_TOOLS_REQUIREMENTS: &str = "spdx-tools==0.8.5\nbeartype==0.23.1\nboolean.py==5.0\nclick==8.5.1\n\
        license-expression==30.4.4\nply==3.11\npyparsing==3.3.3\nPyYAML==6.0.4\nrdflib==7.6.0\n\
        semantic-version==2.10.0\nuritools==7.0.1\nxmltodict==1.0.4\n";
}
