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
