//! Where to pull one image from, in order.

use super::{sort, Credentials, Registry};
use crate::manifest::PinnedImage;

/// The place of an image's own registry in the order when it is not
/// configured: a registry with a smaller number is tried before it (a local
/// mirror), one with a larger number after it (a fallback).
pub const OWN_REGISTRY_PRIORITY: i32 = 100;

/// One place to try a pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The image as named on this registry: same repository, same digest.
    pub image: PinnedImage,
    /// The configured registry's name; `None` for the image's own registry
    /// when no configured entry covers it.
    pub registry: Option<String>,
    pub priority: i32,
    /// Plain HTTP (a loopback registry): the engine must skip TLS for it.
    pub insecure: bool,
    pub credentials: Option<Credentials>,
}

/// The ordered places to pull `image` from: every configured registry by
/// priority (lower first, ties by name), and the image's own registry at
/// [`OWN_REGISTRY_PRIORITY`], after configured registries of that same
/// priority. A configured registry whose `host[:port]` is the image's own
/// registry takes the implicit entry's place, with its own priority and
/// credentials. No server appears twice: of two entries for one host, the
/// first in order wins.
pub fn candidates(image: &PinnedImage, registries: &[Registry]) -> Vec<Candidate> {
    let mut ordered = registries.to_vec();
    sort(&mut ordered);

    let own = image.registry();
    let own_configured = ordered.iter().any(|r| r.url.host_port().eq_ignore_ascii_case(own));
    let mut out: Vec<Candidate> = Vec::with_capacity(ordered.len() + 1);
    let mut own_pending = !own_configured;
    for r in ordered {
        if own_pending && r.priority > OWN_REGISTRY_PRIORITY {
            out.push(implicit(image));
            own_pending = false;
        }
        let host = r.url.host_port();
        if out.iter().any(|c| c.image.registry().eq_ignore_ascii_case(&host)) {
            continue;
        }
        out.push(Candidate {
            image: image.with_registry(&host),
            insecure: r.url.is_insecure(),
            priority: r.priority,
            registry: Some(r.name),
            credentials: r.credentials,
        });
    }
    if own_pending {
        out.push(implicit(image));
    }
    out
}

fn implicit(image: &PinnedImage) -> Candidate {
    Candidate {
        image: image.clone(),
        registry: None,
        priority: OWN_REGISTRY_PRIORITY,
        // Unknown: the engine's own configuration decides how to reach it.
        insecure: false,
        credentials: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    fn image() -> PinnedImage {
        format!("docker.io/getumbrel/electrs:v1@sha256:{HEX}")
            .parse()
            .expect("valid image")
    }

    fn reg(name: &str, url: &str, priority: i32) -> Registry {
        Registry::new(name, url.parse().expect("valid url"), priority).expect("valid name")
    }

    fn places(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.image.by_digest()).collect()
    }

    #[test]
    fn no_configuration_gives_the_image_own_registry_only() {
        let c = candidates(&image(), &[]);
        assert_eq!(places(&c), [image().by_digest()]);
        assert_eq!(c[0].registry, None);
        assert_eq!(c[0].image, image());
    }

    #[test]
    fn a_mirror_with_a_smaller_number_goes_before_the_own_registry_and_a_larger_after() {
        let regs = [
            reg("fallback", "https://backup.example:5000", 200),
            reg("lan", "http://127.0.0.1:5000", 10),
        ];
        let c = candidates(&image(), &regs);
        assert_eq!(
            places(&c),
            [
                format!("127.0.0.1:5000/getumbrel/electrs@sha256:{HEX}"),
                format!("docker.io/getumbrel/electrs@sha256:{HEX}"),
                format!("backup.example:5000/getumbrel/electrs@sha256:{HEX}"),
            ]
        );
        assert_eq!(
            c.iter().map(|c| c.registry.as_deref()).collect::<Vec<_>>(),
            [Some("lan"), None, Some("fallback")]
        );
        assert_eq!(c.iter().map(|c| c.insecure).collect::<Vec<_>>(), [true, false, false]);
    }

    #[test]
    fn every_candidate_keeps_the_digest_and_repository() {
        let regs = [reg("a", "https://a.example", 1), reg("b", "https://b.example", 300)];
        for c in candidates(&image(), &regs) {
            assert_eq!(c.image.digest(), image().digest());
            assert_eq!(c.image.repository(), "getumbrel/electrs");
        }
    }

    #[test]
    fn ties_are_broken_by_name_and_configured_entries_go_before_the_implicit_one() {
        let regs = [
            reg("zeta", "https://z.example", 100),
            reg("alpha", "https://a.example", 100),
        ];
        let c = candidates(&image(), &regs);
        assert_eq!(
            c.iter().map(|c| c.registry.as_deref()).collect::<Vec<_>>(),
            [Some("alpha"), Some("zeta"), None]
        );
    }

    #[test]
    fn a_configured_own_registry_replaces_the_implicit_one_with_its_credentials() {
        let creds = Credentials::new("me", "pw").expect("valid");
        let regs = [
            reg("hub", "https://docker.io", 300).with_credentials(creds.clone()),
            reg("lan", "https://mirror.lan", 10),
        ];
        let c = candidates(&image(), &regs);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].registry.as_deref(), Some("lan"));
        assert_eq!(c[1].registry.as_deref(), Some("hub"));
        assert_eq!(c[1].priority, 300);
        assert_eq!(c[1].image.by_digest(), image().by_digest());
        assert_eq!(c[1].credentials, Some(creds));
        assert_eq!(c[0].credentials, None);
    }

    #[test]
    fn one_server_configured_twice_appears_once_at_its_first_place() {
        let regs = [
            reg("second", "https://mirror.lan:443", 20),
            reg("first", "https://MIRROR.lan", 10),
        ];
        let c = candidates(&image(), &regs);
        assert_eq!(
            c.iter().map(|c| c.registry.as_deref()).collect::<Vec<_>>(),
            [Some("first"), None]
        );
    }

    #[test]
    fn a_docker_hub_library_image_keeps_library_on_a_mirror() {
        let img: PinnedImage = format!("nginx@sha256:{HEX}").parse().expect("valid");
        let c = candidates(&img, &[reg("lan", "https://mirror.lan", 1)]);
        assert_eq!(c[0].image.by_digest(), format!("mirror.lan/library/nginx@sha256:{HEX}"));
        assert_eq!(c[1].image.by_digest(), format!("docker.io/library/nginx@sha256:{HEX}"));
    }
}
