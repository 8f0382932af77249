//! What the image-stage tests (rootfs_build.rs, iso_build.rs) share.

#![allow(dead_code)]

use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

/// One `SOURCE_DATE_EPOCH` for every build test, so that they share one
/// cached base rootfs (`cargo xtask e2e` uses it too: `e2e::SHARED_EPOCH`).
pub const EPOCH: &str = "1700000000";

/// Runs `cargo xtask ARGS` with [`EPOCH`], echoing its progress.
pub fn xtask(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .expect("xtask runs");
    eprintln!(
        "$ xtask {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}
