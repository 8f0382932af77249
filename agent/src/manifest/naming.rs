//! Container names and host ports, in production and dev mode.
//!
//! One function decides a container's name, so that install, adoption and
//! reconcile can never disagree about which container belongs to an app.

use super::{AppKind, Manifest, PortMapping};

/// Added to every host port in dev mode, so a dev stack can run beside a
/// production one.
pub const DEFAULT_DEV_PORT_OFFSET: u16 = 10000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    #[error("{app}: host port {port} plus the dev offset {offset} is {sum}, past 65535; lower the offset or the port")]
    PortOverflow {
        app: String,
        port: u16,
        offset: u16,
        sum: u32,
    },
}

/// The naming rule in force: production, or dev with a port offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Naming {
    #[default]
    Prod,
    Dev {
        port_offset: u16,
    },
}

impl Naming {
    pub fn dev() -> Naming {
        Naming::Dev {
            port_offset: DEFAULT_DEV_PORT_OFFSET,
        }
    }

    /// An explicit `container_name` always wins; otherwise a `ui` app is
    /// `archy-<id>` and a service is `<id>`. Dev mode appends `-dev`.
    pub fn container_name(&self, app: &Manifest) -> String {
        let base = match (&app.container_name, app.kind) {
            (Some(name), _) => name.clone(),
            (None, AppKind::Ui) => format!("archy-{}", app.id),
            (None, AppKind::Service) => app.id.to_string(),
        };
        match self {
            Naming::Prod => base,
            Naming::Dev { .. } => format!("{base}-dev"),
        }
    }

    /// The app's port mappings with the dev offset applied to host ports.
    pub fn ports(&self, app: &Manifest) -> Result<Vec<PortMapping>, NamingError> {
        let offset = match self {
            Naming::Prod => return Ok(app.ports.clone()),
            Naming::Dev { port_offset } => *port_offset,
        };
        app.ports
            .iter()
            .map(|p| {
                let sum = u32::from(p.host) + u32::from(offset);
                let host = u16::try_from(sum).map_err(|_| NamingError::PortOverflow {
                    app: app.id.to_string(),
                    port: p.host,
                    offset,
                    sum,
                })?;
                Ok(PortMapping { host, ..*p })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::Protocol;
    use super::*;

    fn app(id: &str, kind: AppKind, container_name: Option<&str>, host_ports: &[u16]) -> Manifest {
        Manifest {
            kind,
            container_name: container_name.map(str::to_owned),
            ports: host_ports
                .iter()
                .map(|&host| PortMapping {
                    host,
                    container: 80,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            ..crate::manifest::test_app(id, &[])
        }
    }

    fn hosts(ports: &[PortMapping]) -> Vec<u16> {
        ports.iter().map(|p| p.host).collect()
    }

    #[test]
    fn service_container_is_named_after_its_id() {
        assert_eq!(
            Naming::Prod.container_name(&app("electrs", AppKind::Service, None, &[])),
            "electrs"
        );
    }

    #[test]
    fn ui_container_is_archy_dash_id() {
        assert_eq!(
            Naming::Prod.container_name(&app("wallet-ui", AppKind::Ui, None, &[])),
            "archy-wallet-ui"
        );
    }

    #[test]
    fn explicit_container_name_always_wins() {
        for kind in [AppKind::Service, AppKind::Ui] {
            assert_eq!(
                Naming::Prod.container_name(&app("bitcoin-core", kind, Some("bitcoin"), &[])),
                "bitcoin"
            );
        }
    }

    #[test]
    fn dev_mode_appends_dev_to_every_name() {
        let dev = Naming::dev();
        assert_eq!(
            dev.container_name(&app("electrs", AppKind::Service, None, &[])),
            "electrs-dev"
        );
        assert_eq!(
            dev.container_name(&app("w-ui", AppKind::Ui, None, &[])),
            "archy-w-ui-dev"
        );
        assert_eq!(
            dev.container_name(&app("bitcoin-core", AppKind::Service, Some("bitcoin"), &[])),
            "bitcoin-dev"
        );
    }

    #[test]
    fn prod_is_the_default_naming_and_keeps_ports() {
        assert_eq!(Naming::default(), Naming::Prod);
        let a = app("a", AppKind::Service, None, &[80, 65535]);
        assert_eq!(Naming::Prod.ports(&a).expect("no offset"), a.ports);
    }

    #[test]
    fn dev_mode_offsets_host_ports_by_10000_by_default() {
        assert_eq!(DEFAULT_DEV_PORT_OFFSET, 10000);
        assert_eq!(Naming::dev(), Naming::Dev { port_offset: 10000 });
        let a = app("a", AppKind::Service, None, &[8080, 50001, 55535]);
        let ports = Naming::dev().ports(&a).expect("fits");
        assert_eq!(hosts(&ports), [18080, 60001, 65535]);
        // Only the host side moves.
        assert!(ports.iter().all(|p| p.container == 80 && p.protocol == Protocol::Tcp));
    }

    #[test]
    fn dev_port_offset_is_configurable() {
        let a = app("a", AppKind::Service, None, &[8080]);
        let ports = Naming::Dev { port_offset: 1 }.ports(&a).expect("fits");
        assert_eq!(hosts(&ports), [8081]);
    }

    #[test]
    fn dev_port_past_65535_is_refused_naming_app_port_and_sum() {
        let a = app("electrs", AppKind::Service, None, &[8080, 55536]);
        let err = Naming::dev().ports(&a).expect_err("overflows");
        assert_eq!(
            err,
            NamingError::PortOverflow {
                app: "electrs".to_owned(),
                port: 55536,
                offset: 10000,
                sum: 65536,
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("electrs: host port 55536 plus the dev offset 10000 is 65536, past 65535"),
            "{text}"
        );
    }
}
