//! The console text (pure): what a headless owner reads on tty1 or the
//! serial port to reach the node. agetty shows it above the login prompt
//! and replaces `\4` with the node's IPv4 address, again when it changes.

use crate::manifest::{AppKind, LoadReport, Protocol};

use super::keys::PublicKey;

/// An app with a web page, and the port it is served on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiApp {
    pub name: String,
    pub port: u16,
}

/// The `ui` apps of the loaded manifests, each with its first TCP host
/// port, in the manifests' order.
pub fn ui_apps(report: &LoadReport) -> Vec<UiApp> {
    report
        .apps
        .iter()
        .filter(|m| m.kind == AppKind::Ui)
        .filter_map(|m| {
            let port = m.ports.iter().find(|p| p.protocol == Protocol::Tcp)?;
            Some(UiApp {
                name: m.name.clone(),
                port: port.host,
            })
        })
        .collect()
}

/// agetty reads `\` as the start of an escape: a name shows as written.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect::<String>()
        .replace('\\', "\\\\")
}

/// The issue file's text: how to log in, the host key to expect, each UI
/// app's address, and what went wrong, if anything.
pub fn issue_text(host_key: Result<&PublicKey, &str>, apps: &[UiApp], problems: &[String]) -> String {
    let mut out = String::from("Archipelago node\n");
    out.push_str("ssh archipelago@\\4\n");
    match host_key {
        Ok(key) => out.push_str(&format!("ssh host key: {} ({})\n", key.fingerprint(), key.label())),
        Err(why) => out.push_str(&format!("ssh host key: none ({})\n", escaped(why))),
    }
    for app in apps {
        out.push_str(&format!("{}: http://\\4:{}\n", escaped(&app.name), app.port));
    }
    for problem in problems {
        out.push_str(&format!("{}\n", escaped(problem)));
    }
    out.push('\n');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_the_login_the_host_key_and_each_ui_address() {
        let key =
            PublicKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICTIZDkT/58mJaqMOlNmdMOsOEJb3r4bCjuTHsZfsLdS root@x")
                .unwrap();
        let apps = [
            UiApp {
                name: "Wallet UI".into(),
                port: 18080,
            },
            UiApp {
                name: "Back\\slash\nname".into(),
                port: 80,
            },
        ];
        let text = issue_text(Ok(&key), &apps, &["1 app manifest could not be read".into()]);
        assert_eq!(
            text,
            "Archipelago node\n\
             ssh archipelago@\\4\n\
             ssh host key: SHA256:B/pmf/v5gtu6CxRQX93H3/aUKC9JN1hkL6dD2nDoa+Y (ED25519)\n\
             Wallet UI: http://\\4:18080\n\
             Back\\\\slash?name: http://\\4:80\n\
             1 app manifest could not be read\n\n"
        );
        let none = issue_text(Err("ssh-keygen failed"), &[], &[]);
        assert!(none.contains("ssh host key: none (ssh-keygen failed)\n"), "{none}");
    }
}
