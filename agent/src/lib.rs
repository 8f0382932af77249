//! The Archipelago node agent as a library: manifests, the engine seam,
//! and the command line. `main.rs` is a thin wrapper; the xtask reuses the
//! manifest module.

// Fail-points abort the agent on request: test builds only, never a
// release agent (see the `failpoints` feature in Cargo.toml).
#[cfg(all(feature = "failpoints", not(debug_assertions)))]
compile_error!("the `failpoints` feature is for test builds only; a release agent never has it");

pub mod appdir;
pub mod cli;
pub mod control;
pub mod datadisk;
pub mod dataroot;
pub mod engine;
pub mod files;
pub mod fsutil;
pub mod images;
pub mod manifest;
pub mod mount;
pub mod orchestrator;
pub mod os;
pub mod ownership;
pub mod reconcile;
pub mod registry;
pub mod secrets;
pub mod spec;
pub mod ssh;
pub mod writer;

/// `e` and its causes on one line, `: `-separated, as anyhow's `{:#}`
/// prints them: for errors reported as text rather than returned.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
