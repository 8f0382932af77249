//! What the image-stage tests (rootfs_build.rs, iso_build.rs) share.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

/// One `SOURCE_DATE_EPOCH` for every build test, so that they share one
/// cached base rootfs (`cargo xtask e2e` uses it too: `e2e::SHARED_EPOCH`).
pub const EPOCH: &str = "1700000000";

/// Runs `cargo xtask ARGS` with [`EPOCH`], echoing its progress.
pub fn xtask(args: &[&str]) -> Output {
    xtask_with_env(args, &[])
}

/// [`xtask`] with extra environment variables.
pub fn xtask_with_env(args: &[&str], vars: &[(&str, &OsStr)]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .envs(vars.iter().copied())
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

/// A variable `cargo xtask test` sets for the services it started; the
/// test fails, never skips, without it.
pub fn test_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: run the tests through `cargo xtask test`, which starts the services they need"),
    }
}

/// One app whose image `cargo xtask test` pushed to the plain loopback
/// registry, and a registry list naming that registry.
pub struct TestApp {
    /// The manifests folder, with `<id>/manifest.yml`.
    pub manifests: PathBuf,
    pub registries: PathBuf,
    /// The app's pinned image reference.
    pub image: String,
}

pub fn one_app_from_the_test_registry(dir: &Path, id: &str) -> TestApp {
    let manifests = dir.join("manifests");
    let image = test_var("ARCHY_TEST_IMAGE");
    fs::create_dir_all(manifests.join(id)).expect("create the app folder");
    fs::write(
        manifests.join(id).join("manifest.yml"),
        format!("id: {id}\nname: {id}\nversion: \"1\"\nimage: {image}\n"),
    )
    .expect("write the manifest");
    let registries = dir.join("registries.json");
    fs::write(
        &registries,
        format!(
            "{{\"version\": 1, \"registries\": [{{\"name\": \"local\", \"url\": \"http://{}\", \"priority\": 100}}]}}\n",
            test_var("ARCHY_TEST_REGISTRY")
        ),
    )
    .expect("write the registry list");
    TestApp {
        manifests,
        registries,
        image,
    }
}
