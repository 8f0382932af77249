//! Reconciliation: planning (pure) and the passes that carry plans out.

pub mod backoff;
pub mod plan;
