//! Project automation: `cargo xtask <command>`.
//!
//! Every stage installs the host tools it needs (see `cargo xtask doctor`),
//! so a fresh CI machine and a developer's machine run the same steps.

mod bench;
mod harness;
mod pipeline;
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Archipelago build and test automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a private Podman API service and two loopback registries with
    /// test images, run `cargo test --workspace` against them, tear them down.
    Test {
        /// Extra arguments for `cargo test --workspace`, after `--`
        /// (e.g. `cargo xtask test -- -p archy-agent -- --nocapture`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Pull every app image by digest (or build it), verify it, and write one archive per app plus images.lock.json.
    Images(pipeline::images::Args),
    /// Build the UI base image (Debian 12 essential + nginx, mmdebstrap) as a reproducible
    /// docker-archive pinned by digest (output: target/base-image/ui-base.tar and ui-base.lock.json).
    BaseImage(pipeline::base_image::Args),
    /// Build the Debian 12 rootfs: the cached base from mmdebstrap, plus the
    /// agent, manifests and images (output: target/rootfs/tree).
    Rootfs(pipeline::flags::BuildArgs),
    /// Build the hybrid BIOS/UEFI ISO (output: target/iso/archipelago-<version>-amd64.iso,
    /// SHA256SUMS, build-report.json).
    Iso(pipeline::iso::IsoArgs),
    /// Measure the agent's performance targets against the real Podman service, each with a
    /// baseline from the same run; prints a table and writes target/bench/report.md.
    Bench(bench::BenchArgs),
    /// Boot an ISO with a test app set in QEMU (SeaBIOS and UEFI, no network) and check first
    /// boot, adoption across a reboot and a killed app's restart. Also part of `cargo xtask test`.
    E2e(harness::e2e::E2eArgs),
    /// Build the ISO cold (fresh base rootfs) and warm (only the agent changed) and report
    /// times, ISO size and squashfs vs tar; prints a table and writes target/bench/iso-report.md.
    BenchIso(bench::iso::BenchIsoArgs),
    /// List the host tools each stage needs, whether each is present, and how to install what is missing.
    Doctor,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    // Paths in every stage (target/, manifests/) are relative to the root,
    // whatever directory `cargo xtask` was started from.
    let root = project_root()?;
    std::env::set_current_dir(&root)
        .with_context(|| format!("changing directory to the project root {}", root.display()))?;
    let cli = Cli::parse();
    match cli.command {
        Command::Test { cargo_args } => harness::test_env::run(&root, &cargo_args),
        Command::Rootfs(args) => pipeline::rootfs::run(&root, &args),
        Command::Iso(args) => pipeline::iso::run(&root, &args),
        Command::Images(args) => pipeline::images::run(&args),
        Command::BaseImage(args) => pipeline::base_image::run(&root, &args),
        Command::Bench(args) => bench::run(&root, &args),
        Command::E2e(args) => harness::e2e::run(&root, &args),
        Command::BenchIso(args) => bench::iso::run(&root, &args),
        Command::Doctor => Ok(tools::doctor()),
    }
}

fn project_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("xtask's manifest dir {} has no parent", manifest_dir.display()))
}
