//! The agent's control socket: JSON-RPC 2.0 over a unix socket, one request
//! per line (`docs/control.md`).
//!
//! The running agent serves it ([`serve`] with an [`OrchestratorHandler`]);
//! `archy-agent` subcommands call it ([`ControlClient`]) when an agent
//! answers, so that they go through the agent's per-app locks instead of
//! racing it, and act in-process ([`AppBackend::Local`],
//! [`crate::registry::commands::LocalRegistries`]) when none does.

mod client;
mod handler;
pub mod protocol;
mod server;

use async_trait::async_trait;
use serde_json::Value;

pub use client::{registry_backend, route, AppBackend, ControlClient, RemoteOrchestrator, RemoteRegistries, Route};
pub use handler::{reconcile_bridge, OrchestratorHandler, ReconcileNow};
pub use protocol::{Call, InstallTarget, RpcError};
pub use server::{respond, serve, serve_connection, serve_with, ServeLimits};

/// Where the agent listens unless told otherwise (`--control`,
/// `ARCHY_CONTROL`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/archipelago/agent.sock";

/// What answers the calls. [`serve`] has already checked the envelope and
/// the params; the handler only does the work.
#[async_trait]
pub trait ControlHandler: Send + Sync {
    /// Runs one call. The result is the method's JSON result; an error is
    /// sent back as the JSON-RPC error object, message and all, so it must
    /// never carry a secret.
    async fn handle(&self, call: Call) -> Result<Value, RpcError>;
}
