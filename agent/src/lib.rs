//! The Archipelago node agent as a library: manifests, the engine seam,
//! and the command line. `main.rs` is a thin wrapper; the xtask reuses the
//! manifest module.

pub mod cli;
pub mod control;
pub mod datadisk;
pub mod engine;
pub mod files;
pub mod fsutil;
pub mod images;
pub mod manifest;
pub mod orchestrator;
pub mod ownership;
pub mod reconcile;
pub mod registry;
pub mod secrets;
pub mod spec;
