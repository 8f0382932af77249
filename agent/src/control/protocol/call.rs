//! From a method and its named params to a typed [`Call`].

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::{kind, RpcError, METHODS};
use crate::registry::commands::NewRegistry;

/// What `container-install` installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallTarget {
    /// An app of the agent's apps folder.
    App(String),
    /// A manifest file anywhere, by absolute path (dev-mode agents only).
    Manifest(PathBuf),
}

/// One method call with its params checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Install(InstallTarget),
    Start {
        app: String,
    },
    Stop {
        app: String,
    },
    Restart {
        app: String,
    },
    Remove {
        app: String,
    },
    Upgrade {
        app: String,
    },
    Status {
        app: String,
    },
    List,
    Logs {
        app: String,
        tail: Option<usize>,
    },
    Health {
        app: String,
    },
    RegistryList,
    RegistryAdd(NewRegistry),
    RegistryRemove {
        name: String,
    },
    RegistryTest {
        name: Option<String>,
    },
    ReconcileNow,
    /// The OS: booted slot, each slot's release and state, the last rollback.
    OsStatus,
    /// Installs an OS update bundle (a path the agent can read, or an
    /// https:// URL) through the root helper (docs/updates.md).
    OsUpdate {
        source: String,
        allow_downgrade: bool,
    },
}

impl Call {
    /// The method name this call came from (for logs).
    pub fn method(&self) -> &'static str {
        match self {
            Call::Install(_) => "container-install",
            Call::Start { .. } => "container-start",
            Call::Stop { .. } => "container-stop",
            Call::Restart { .. } => "container-restart",
            Call::Remove { .. } => "container-remove",
            Call::Upgrade { .. } => "container-upgrade",
            Call::Status { .. } => "container-status",
            Call::List => "container-list",
            Call::Logs { .. } => "container-logs",
            Call::Health { .. } => "container-health",
            Call::RegistryList => "registry.list",
            Call::RegistryAdd(_) => "registry.add",
            Call::RegistryRemove { .. } => "registry.remove",
            Call::RegistryTest { .. } => "registry.test",
            Call::ReconcileNow => "reconcile-now",
            Call::OsStatus => "os.status",
            Call::OsUpdate { .. } => "os.update",
        }
    }

    /// Checks `params` against `method` and builds the call.
    pub fn parse(method: &str, params: Map<String, Value>) -> Result<Call, RpcError> {
        let Some((method, allowed)) = METHODS.iter().find(|(name, _)| *name == method).copied() else {
            return Err(RpcError::method_not_found(method));
        };
        let mut p = Params::new(method, allowed, params)?;
        let call = match method {
            "container-install" => match (p.string("app")?, p.string("manifest")?) {
                (Some(app), None) => Call::Install(InstallTarget::App(app)),
                (None, Some(path)) => {
                    let path = PathBuf::from(path);
                    if !path.is_absolute() {
                        return Err(p.invalid("manifest", "must be an absolute path"));
                    }
                    Call::Install(InstallTarget::Manifest(path))
                }
                (Some(_), Some(_)) => return Err(p.invalid("manifest", "cannot be given together with \"app\"")),
                (None, None) => return Err(p.invalid("app", "is required (an app id), or \"manifest\" instead")),
            },
            "container-start" => Call::Start { app: p.app()? },
            "container-stop" => Call::Stop { app: p.app()? },
            "container-restart" => Call::Restart { app: p.app()? },
            "container-remove" => Call::Remove { app: p.app()? },
            "container-upgrade" => Call::Upgrade { app: p.app()? },
            "container-status" => Call::Status { app: p.app()? },
            "container-list" => Call::List,
            "container-logs" => Call::Logs {
                app: p.app()?,
                tail: p.count("tail")?,
            },
            "container-health" => Call::Health { app: p.app()? },
            "registry.list" => Call::RegistryList,
            "registry.add" => Call::RegistryAdd(NewRegistry {
                name: p.required("name", "a registry name")?,
                url: p.required("url", "a registry url")?,
                priority: p.priority("priority")?.unwrap_or(crate::registry::DEFAULT_PRIORITY),
                username: p.string("username")?,
                password: p.string("password")?,
            }),
            "registry.remove" => Call::RegistryRemove {
                name: p.required("name", "a registry name")?,
            },
            "registry.test" => Call::RegistryTest {
                name: p.string("name")?,
            },
            "reconcile-now" => Call::ReconcileNow,
            "os.status" => Call::OsStatus,
            "os.update" => {
                let source = p.required("source", "a bundle's absolute path or an https:// URL")?;
                if !crate::os::update::is_url(&source) && !std::path::Path::new(&source).is_absolute() {
                    return Err(p.invalid("source", "must be an absolute path or an https:// URL"));
                }
                let allow_downgrade = match p.map.remove("allow_downgrade") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => b,
                    Some(other) => {
                        return Err(p.invalid("allow_downgrade", &format!("must be a boolean, not {}", kind(&other))))
                    }
                };
                Call::OsUpdate {
                    source,
                    allow_downgrade,
                }
            }
            other => return Err(RpcError::method_not_found(other)),
        };
        Ok(call)
    }
}

/// Named params being taken apart for one method.
struct Params {
    method: &'static str,
    allowed: &'static [&'static str],
    map: Map<String, Value>,
}

impl Params {
    /// Refuses any param the method does not take.
    fn new(
        method: &'static str,
        allowed: &'static [&'static str],
        map: Map<String, Value>,
    ) -> Result<Params, RpcError> {
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let takes = if allowed.is_empty() {
                "takes no params".to_owned()
            } else {
                format!("takes {}", allowed.join(", "))
            };
            return Err(RpcError::invalid_param(
                method,
                unknown,
                format!("is not a param of {method}, which {takes}"),
                allowed,
            ));
        }
        Ok(Params { method, allowed, map })
    }

    fn invalid(&self, param: &str, problem: &str) -> RpcError {
        RpcError::invalid_param(self.method, param, problem, self.allowed)
    }

    /// A string param; `null` counts as absent.
    fn string(&mut self, name: &str) -> Result<Option<String>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(name, &format!("must be a string, not {}", kind(&other)))),
        }
    }

    fn required(&mut self, name: &str, what: &str) -> Result<String, RpcError> {
        self.string(name)?
            .ok_or_else(|| self.invalid(name, &format!("is required ({what})")))
    }

    fn app(&mut self) -> Result<String, RpcError> {
        self.required("app", "an app id")
    }

    /// A non-negative integer param.
    fn count(&mut self, name: &str) -> Result<Option<usize>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(name, "must be a non-negative integer")),
        }
    }

    fn priority(&mut self, name: &str) -> Result<Option<i32>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(name, "must be an integer (lower is tried first)")),
        }
    }
}
