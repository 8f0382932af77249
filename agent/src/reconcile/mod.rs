//! Reconciliation: planning (pure) and the passes that carry plans out.

pub mod backoff;
pub mod commands;
pub mod daemon;
pub mod pass;
pub mod plan;
pub mod state;
