//! Typed orchestrator errors on the wire and back: a code per variant,
//! its fields in the error's `data`.

use serde_json::{json, Value};

use super::{
    RpcError, ALREADY_EXISTS, DEV_ONLY, NOT_INSTALLED, PULL_FAILED, SERVER_ERROR, UNKNOWN_APP, UPGRADE_FAILED,
};
use crate::orchestrator::{OrchestratorError, PullAttempt};

/// The RPC error for an orchestrator error: a code per typed variant, its
/// fields in `data`, and the whole chain of causes as the message.
pub fn from_orchestrator(e: &OrchestratorError) -> RpcError {
    let message = crate::error_chain(e);
    match e {
        OrchestratorError::UnknownApp { app, known } => {
            RpcError::new(UNKNOWN_APP, message).with_data(json!({ "app": app, "known": known }))
        }
        OrchestratorError::NotInstalled { app, container } => {
            RpcError::new(NOT_INSTALLED, message).with_data(json!({ "app": app, "container": container }))
        }
        OrchestratorError::PullFailed { app, image, attempts } => {
            RpcError::new(PULL_FAILED, message).with_data(json!({ "app": app, "image": image, "attempts": attempts }))
        }
        OrchestratorError::UpgradeFailed {
            app,
            reason,
            rolled_back,
        } => RpcError::new(UPGRADE_FAILED, message)
            .with_data(json!({ "app": app, "reason": reason, "rolled_back": rolled_back })),
        OrchestratorError::AlreadyExists { app, container } => {
            RpcError::new(ALREADY_EXISTS, message).with_data(json!({ "app": app, "container": container }))
        }
        OrchestratorError::DevOnly => RpcError::new(DEV_ONLY, message),
        OrchestratorError::Held { .. }
        | OrchestratorError::Naming(_)
        | OrchestratorError::Engine { .. }
        | OrchestratorError::Other(_) => RpcError::new(SERVER_ERROR, message),
    }
}

/// The orchestrator error an RPC error stands for: the typed variant back
/// when the code and data name one, else `Other` with the agent's message.
pub fn into_orchestrator(e: RpcError) -> OrchestratorError {
    fn field<T: serde::de::DeserializeOwned>(data: &Option<Value>, name: &str) -> Option<T> {
        serde_json::from_value(data.as_ref()?.get(name)?.clone()).ok()
    }
    let d = &e.data;
    let typed = match e.code {
        UNKNOWN_APP => field(d, "app")
            .zip(field(d, "known"))
            .map(|(app, known)| OrchestratorError::UnknownApp { app, known }),
        NOT_INSTALLED => field(d, "app")
            .zip(field(d, "container"))
            .map(|(app, container)| OrchestratorError::NotInstalled { app, container }),
        PULL_FAILED => field(d, "app")
            .zip(field(d, "image"))
            .zip(field::<Vec<PullAttempt>>(d, "attempts"))
            .map(|((app, image), attempts)| OrchestratorError::PullFailed { app, image, attempts }),
        UPGRADE_FAILED => field(d, "app")
            .zip(field(d, "reason"))
            .zip(field(d, "rolled_back"))
            .map(|((app, reason), rolled_back)| OrchestratorError::UpgradeFailed {
                app,
                reason,
                rolled_back,
            }),
        ALREADY_EXISTS => field(d, "app")
            .zip(field(d, "container"))
            .map(|(app, container)| OrchestratorError::AlreadyExists { app, container }),
        DEV_ONLY => Some(OrchestratorError::DevOnly),
        _ => None,
    };
    typed.unwrap_or_else(|| OrchestratorError::Other(anyhow::Error::new(e)))
}
