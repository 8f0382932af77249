//! `cargo xtask bench-iso`: the image pipeline's targets, from two real
//! builds of the ISO without app images (`--no-images`), one after the other:
//!
//! 1. **cold**: nothing cached. The release agent is compiled from
//!    scratch, dependencies included, in a cargo target folder of the
//!    bench's own (`target/bench/iso/cargo`), and the base rootfs comes
//!    fresh from mmdebstrap, in a cache folder of the bench's own
//!    (`target/bench/iso/cache`); both are emptied first, so the shared
//!    `target/` is neither read nor written. Every package is downloaded
//!    from Debian's archive, unless `--reuse-debs` seeds that folder with
//!    `target/cache/debs` (apt still fetches the archive's indices); crates
//!    come from cargo's own download cache.
//! 2. **warm**: a comment line added at the top of
//!    `agent/src/reconcile/daemon.rs` (and removed at the end), as after an
//!    edit of the agent, and the same build again: cargo recompiles the
//!    `archy-agent` crate (release: incremental, so what the edit moved is
//!    compiled again) and the base comes from the bench's cache; the
//!    rootfs is unpacked and checked, and the squashfs and ISO are made
//!    again, as every build does. A mere touch would not do: incremental
//!    compilation finds nothing changed and reuses everything.
//!
//! | figure | baseline | target |
//! | --- | --- | --- |
//! | cold build | — | — |
//! | warm rebuild | the cold build | ≤ 0.25× |
//! | ISO size | — | ≤ 300 MB |
//! | squashfs | a tar of the same rootfs tree | — |
//! | that tar with zstd -9, for scale | the tar | — |
//!
//! Each build's stages are listed side by side, so the table says where
//! the time goes. The report, with the date and the machine, goes to
//! `target/bench/iso-report.md`. A missed target is reported, not fatal.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::bench::table::{self, Row, Unit};
use crate::harness::procs::capture;
use crate::pipeline::flags::{self, Arch, BuildArgs, Epoch};
use crate::pipeline::iso;
use crate::pipeline::progress;
use crate::pipeline::report::StageRecord;
use crate::pipeline::rootfs::{BasePolicy, TREE_TAR_FLAGS};
use crate::tools;

#[derive(Debug, clap::Args)]
pub struct BenchIsoArgs {
    /// Seed the cold build's empty package cache with target/cache/debs, so
    /// that "cold" leaves out downloading the packages themselves.
    #[arg(long)]
    reuse_debs: bool,
}

/// Edited before the warm build. The line moves every span after it
/// (tracing's call sites and panic locations carry line numbers), so the
/// module's code is compiled again, as after a developer's edit.
const AGENT_EDIT_FILE: &str = "agent/src/reconcile/daemon.rs";
const AGENT_EDIT_LINE: &str = "// cargo xtask bench-iso: the warm build's edit; the bench removes this line.\n";
const WARM_WHAT: &str = "a line added to agent/src/reconcile/daemon.rs";
const WORK_SUBDIR: &str = "bench/iso";
/// The stage name in progress lines.
const STAGE: &str = "bench-iso";
const REPORT_FILE: &str = "bench/iso-report.md";
const ISO_MAX_BYTES: f64 = 300e6;
const WARM_MAX_RATIO: f64 = 0.25;
/// The squashfs's zstd level, on every core, so that only the container
/// format differs.
const ZSTD_FLAGS: &[&str] = &["-9", "-T0", "-q", "-f"];
const DEBS_SUBDIR: &str = "debs";
const STAGE_BASE: &str = "rootfs-base";
const STAGE_SQUASHFS: &str = "squashfs";
const STAGE_AGENT: &str = "agent";

/// What the two builds measured.
#[derive(Debug, Clone, PartialEq)]
struct Measured {
    cold_seconds: f64,
    warm_seconds: f64,
    iso_bytes: u64,
    squashfs_bytes: u64,
    tar_bytes: u64,
    tar_zst_bytes: u64,
    tar_zst_seconds: f64,
    squashfs_seconds: f64,
    /// The agent stage of each build: cargo, up to date (cold) or
    /// recompiling the agent crate (warm).
    cold_agent_seconds: f64,
    warm_agent_seconds: f64,
}

/// What the cold build included, for the table's first row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cold {
    reused_debs: usize,
    downloaded_debs: usize,
}

impl Cold {
    fn describe(&self) -> String {
        if self.reused_debs == 0 {
            format!(
                "cold build: agent from scratch, fresh base from mmdebstrap, {} packages downloaded",
                self.downloaded_debs
            )
        } else {
            format!(
                "cold build: agent from scratch, fresh base from mmdebstrap, {} packages reused, {} downloaded",
                self.reused_debs, self.downloaded_debs
            )
        }
    }
}

pub fn run(root: &Path, args: &BenchIsoArgs) -> anyhow::Result<ExitCode> {
    flags::require_root("bench-iso")?;
    let sh = Shell::new().context("creating a shell")?;
    for stage in [tools::ROOTFS_STAGE, tools::ISO_STAGE, tools::BENCH_ISO_STAGE] {
        tools::ensure(&sh, stage)?;
    }
    let target = flags::target_dir(root);
    let dir = target.join(WORK_SUBDIR);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing the last bench's {}", dir.display()))?;
    }
    let cache = dir.join("cache");
    let debs = cache.join(DEBS_SUBDIR);
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let reused_debs = if args.reuse_debs {
        seed_debs(&target.join("cache").join(DEBS_SUBDIR), &debs)?
    } else {
        0
    };
    let build_args = BuildArgs {
        arch: Arch::Amd64,
        manifests: root.join("manifests"),
        registries: None,
        images: None,
        no_images: true,
        out: None,
        agent: None,
        no_cache: false,
        cache: Some(cache),
        overlay: None,
        boot_menu: None,
        release: crate::pipeline::flags::ReleaseArgs::default(),
    };
    let epoch = Epoch::from_env()?;

    // Every cargo build below, and the pipeline's look for the binary,
    // go to the bench's own target folder (this process runs nothing else).
    std::env::set_var("CARGO_TARGET_DIR", dir.join("cargo"));

    progress::say(
        STAGE,
        "build 1 of 2, cold: the agent from scratch, a fresh base from mmdebstrap",
    );
    let cold = iso::build_iso(root, &sh, &build_args, epoch, &dir.join("cold"), BasePolicy::Cached)?;
    expect_base(&cold.stages, "built")?;
    let downloaded_debs = count_debs(&debs)?.saturating_sub(reused_debs);
    let cold_what = Cold {
        reused_debs,
        downloaded_debs,
    };
    let squashfs_bytes = file_size(&cold.work.join("iso/live/filesystem.squashfs"))?;
    progress::say(STAGE, "comparing the squashfs with a tar of the same rootfs tree");
    let (tar_bytes, tar_zst_bytes, tar_zst_seconds) = tarballs(&sh, &cold.work.join("rootfs"), &dir)?;
    iso::remove_work(&cold.work)?;

    progress::say(STAGE, &format!("build 2 of 2, warm: {WARM_WHAT}"));
    let edit = AgentEdit::apply(&root.join(AGENT_EDIT_FILE))?;
    let warm = iso::build_iso(root, &sh, &build_args, epoch, &dir.join("warm"), BasePolicy::Cached)?;
    edit.undo()?;
    expect_base(&warm.stages, "cached")?;
    iso::remove_work(&warm.work)?;

    let measured = Measured {
        cold_seconds: cold.total_seconds,
        warm_seconds: warm.total_seconds,
        iso_bytes: warm.size,
        squashfs_bytes,
        tar_bytes,
        tar_zst_bytes,
        tar_zst_seconds,
        squashfs_seconds: stage_seconds(&cold.stages, STAGE_SQUASHFS).unwrap_or(0.0),
        cold_agent_seconds: stage_seconds(&cold.stages, STAGE_AGENT).unwrap_or(0.0),
        warm_agent_seconds: stage_seconds(&warm.stages, STAGE_AGENT).unwrap_or(0.0),
    };
    let rows = rows(&measured, &cold_what);
    let stages = stage_table(&cold.stages, &warm.stages);
    println!("{}\n\n{stages}", table::render_text(&rows));

    let facts = format!(
        "{}. MB = 10⁶ bytes. Cold: {}; warm: {WARM_WHAT}, the base from the cache.",
        table::measured_on(&sh),
        cold_what.describe().trim_start_matches("cold build: ")
    );
    let report = format!(
        "{}\nEach build's stages:\n\n{stages}\n",
        table::render_markdown(&rows, &facts)
    );
    let path = target.join(REPORT_FILE);
    fs::write(&path, report).with_context(|| format!("writing the bench report {}", path.display()))?;
    println!("report written to {}", path.display());
    table::print_missed(&rows);
    // The bench's cache is several hundred MB that nothing else reads.
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// The table's rows, from what the builds measured.
fn rows(m: &Measured, cold: &Cold) -> Vec<Row> {
    let row = |figure: String, unit: Unit, measured: f64| Row {
        figure,
        unit,
        measured: Some(measured),
        baseline: None,
        baseline_what: String::new(),
        max: None,
        max_ratio: None,
        failure: None,
    };
    let tar_what = "an uncompressed tar of the same rootfs tree".to_owned();
    vec![
        row(cold.describe(), Unit::Seconds, m.cold_seconds),
        Row {
            baseline: Some(m.cold_seconds),
            baseline_what: "the cold build".into(),
            max_ratio: Some(WARM_MAX_RATIO),
            ..row(
                format!("warm rebuild: {WARM_WHAT}, cached base"),
                Unit::Seconds,
                m.warm_seconds,
            )
        },
        // The same two builds without their agent stage: what the image
        // pipeline itself spends, apart from cargo.
        Row {
            baseline: Some(m.cold_seconds - m.cold_agent_seconds),
            baseline_what: "the cold build without its agent stage".into(),
            ..row(
                "warm rebuild without the agent's compile".into(),
                Unit::Seconds,
                m.warm_seconds - m.warm_agent_seconds,
            )
        },
        Row {
            max: Some(ISO_MAX_BYTES),
            ..row("ISO without images".into(), Unit::Bytes, m.iso_bytes as f64)
        },
        Row {
            baseline: Some(m.tar_bytes as f64),
            baseline_what: tar_what.clone(),
            ..row(
                "squashfs (zstd 9, 1 MiB blocks)".into(),
                Unit::Bytes,
                m.squashfs_bytes as f64,
            )
        },
        Row {
            baseline: Some(m.tar_bytes as f64),
            baseline_what: tar_what,
            ..row(
                "rootfs tar, zstd -9 (for scale)".into(),
                Unit::Bytes,
                m.tar_zst_bytes as f64,
            )
        },
        Row {
            baseline: Some(m.tar_zst_seconds),
            baseline_what: "tar, then zstd -9 on every core, of the same tree".into(),
            ..row("time to make the squashfs".into(), Unit::Seconds, m.squashfs_seconds)
        },
    ]
}

fn stage_seconds(stages: &[StageRecord], name: &str) -> Option<f64> {
    stages.iter().find(|s| s.name == name).map(|s| s.seconds)
}

/// Both builds' stages side by side, in the cold build's order.
fn stage_table(cold: &[StageRecord], warm: &[StageRecord]) -> String {
    let mut out = String::from("| stage | cold | warm | cold: note | warm: note |\n| --- | --- | --- | --- | --- |");
    let mut names: Vec<&str> = cold.iter().map(|s| s.name.as_str()).collect();
    for stage in warm {
        if !names.contains(&stage.name.as_str()) {
            names.push(&stage.name);
        }
    }
    let cell = |stages: &[StageRecord], name: &str| -> (String, String) {
        stages.iter().find(|s| s.name == name).map_or_else(
            || ("—".to_owned(), String::new()),
            |s| (progress::human_duration(s.seconds), s.note.clone()),
        )
    };
    for name in names {
        let (cold_time, cold_note) = cell(cold, name);
        let (warm_time, warm_note) = cell(warm, name);
        out.push_str(&format!(
            "\n| {name} | {cold_time} | {warm_time} | {cold_note} | {warm_note} |"
        ));
    }
    out
}

/// The base stage's note says whether it was built or cached; a bench
/// whose cold build hit a cache (or warm one missed it) measures nothing.
fn expect_base(stages: &[StageRecord], how: &str) -> anyhow::Result<()> {
    let note = stages
        .iter()
        .find(|s| s.name == STAGE_BASE)
        .map(|s| s.note.as_str())
        .context("the build recorded no rootfs-base stage")?;
    if !note.starts_with(how) {
        bail!("the bench expected a {how} base rootfs, the build says: {note}");
    }
    Ok(())
}

fn seed_debs(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    for entry in fs::read_dir(from).with_context(|| format!("listing {} (for --reuse-debs)", from.display()))? {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".deb") {
            fs::copy(entry.path(), to.join(&name)).with_context(|| format!("copying {}", entry.path().display()))?;
            count += 1;
        }
    }
    Ok(count)
}

fn count_debs(dir: &Path) -> anyhow::Result<usize> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .count())
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

/// The tree as a plain tar and as tar.zst: (tar bytes, tar.zst bytes,
/// seconds to make both). Both files are removed again.
fn tarballs(sh: &Shell, tree: &Path, dir: &Path) -> anyhow::Result<(u64, u64, f64)> {
    let tar: PathBuf = dir.join("rootfs.tar");
    let zst: PathBuf = dir.join("rootfs.tar.zst");
    let started = Instant::now();
    capture(cmd!(sh, "tar {TREE_TAR_FLAGS...} -C {tree} -cf {tar} ."))
        .with_context(|| format!("making a tar of {}", tree.display()))?;
    capture(cmd!(sh, "zstd {ZSTD_FLAGS...} {tar} -o {zst}"))
        .with_context(|| format!("compressing {}", tar.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let sizes = (file_size(&tar)?, file_size(&zst)?);
    for file in [&tar, &zst] {
        fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
    }
    Ok((sizes.0, sizes.1, seconds))
}

/// The warm build's edit of an agent source file: [`AGENT_EDIT_LINE`] on
/// top. Undone explicitly after the build, or when dropped on an error
/// path. Undoing removes that first line only, so an edit the developer
/// made to the file meanwhile is kept.
struct AgentEdit {
    path: PathBuf,
    undone: bool,
}

impl AgentEdit {
    fn apply(path: &Path) -> anyhow::Result<AgentEdit> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // A bench killed mid-build leaves its line: never stack a second.
        if !text.starts_with(AGENT_EDIT_LINE) {
            fs::write(path, format!("{AGENT_EDIT_LINE}{text}"))
                .with_context(|| format!("adding the warm build's edit to {}", path.display()))?;
        }
        Ok(AgentEdit {
            path: path.to_path_buf(),
            undone: false,
        })
    }

    fn undo(mut self) -> anyhow::Result<()> {
        self.undone = true;
        Self::remove_line(&self.path)
    }

    fn remove_line(path: &Path) -> anyhow::Result<()> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if let Some(rest) = text.strip_prefix(AGENT_EDIT_LINE) {
            fs::write(path, rest).with_context(|| format!("removing the warm build's edit from {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for AgentEdit {
    fn drop(&mut self) {
        if !self.undone {
            if let Err(e) = Self::remove_line(&self.path) {
                eprintln!(
                    "xtask: [bench-iso] {e:#}: remove its first line by hand ({})",
                    AGENT_EDIT_LINE.trim_end()
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::table::Verdict;

    fn measured(cold: f64, warm: f64, iso: u64) -> Measured {
        Measured {
            cold_seconds: cold,
            warm_seconds: warm,
            iso_bytes: iso,
            squashfs_bytes: 200_000_000,
            tar_bytes: 800_000_000,
            tar_zst_bytes: 180_000_000,
            tar_zst_seconds: 40.0,
            squashfs_seconds: 60.0,
            cold_agent_seconds: 1.0,
            warm_agent_seconds: 50.0,
        }
    }

    fn stage(name: &str, seconds: f64, note: &str) -> StageRecord {
        StageRecord {
            name: name.into(),
            seconds,
            output_bytes: None,
            note: note.into(),
        }
    }

    const COLD: Cold = Cold {
        reused_debs: 0,
        downloaded_debs: 180,
    };

    #[test]
    fn warm_meets_its_target_at_a_quarter_of_cold_and_not_above() {
        let rows = rows(&measured(400.0, 100.0, 250_000_000), &COLD);
        assert_eq!(rows[1].ratio(), Some(0.25));
        assert_eq!(rows[1].verdict(), Verdict::Met);
        let rows = super::rows(&measured(400.0, 101.0, 250_000_000), &COLD);
        assert_eq!(
            rows[1].verdict(),
            Verdict::Missed(vec!["0.25× > 0.25× baseline".into()]),
            "101 / 400 = 0.2525 is over the target even when it prints as 0.25"
        );
    }

    #[test]
    fn the_iso_size_target_is_300_mb() {
        let rows = rows(&measured(400.0, 50.0, 300_000_000), &COLD);
        assert_eq!(rows[3].verdict(), Verdict::Met);
        let rows = super::rows(&measured(400.0, 50.0, 300_000_001), &COLD);
        assert!(matches!(rows[3].verdict(), Verdict::Missed(_)));
    }

    #[test]
    fn the_table_says_what_cold_included_and_compares_with_the_tar() {
        let rows = rows(&measured(400.0, 100.0, 250_000_000), &COLD);
        let md = table::render_markdown(&rows, "Measured now.");
        assert!(
            md.contains("| cold build: agent from scratch, fresh base from mmdebstrap, 180 packages downloaded | 6m40s | — | — | — | — |"),
            "{md}"
        );
        assert!(
            md.contains("| warm rebuild: a line added to agent/src/reconcile/daemon.rs, cached base | 1m40s | 6m40s | 0.25× | ≤ 0.25× baseline | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| warm rebuild without the agent's compile | 50.0s | 6m39s | 0.13× | — | — |"),
            "{md}"
        );
        assert!(
            md.contains("| ISO without images | 250.0 MB | — | — | ≤ 300.0 MB | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| squashfs (zstd 9, 1 MiB blocks) | 200.0 MB | 800.0 MB | 0.25× | — | — |"),
            "{md}"
        );
        assert!(
            md.contains("| time to make the squashfs | 1m00s | 40.0s | 1.50× | — | — |"),
            "{md}"
        );
        let reused = Cold {
            reused_debs: 170,
            downloaded_debs: 2,
        };
        assert_eq!(
            reused.describe(),
            "cold build: agent from scratch, fresh base from mmdebstrap, 170 packages reused, 2 downloaded"
        );
    }

    #[test]
    fn stage_table_lines_up_both_builds_by_stage() {
        let cold = [
            stage("inputs", 0.2, "4 apps, 0 images"),
            stage("rootfs-base", 250.0, "built, key 0123"),
            stage("iso", 3.0, ""),
        ];
        let warm = [
            stage("inputs", 0.3, "4 apps, 0 images"),
            stage("rootfs-base", 0.0, "cached, key 0123"),
            stage("extra", 1.0, ""),
        ];
        let table = stage_table(&cold, &warm);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| stage | cold | warm | cold: note | warm: note |");
        assert_eq!(
            lines[2],
            "| inputs | 0.2s | 0.3s | 4 apps, 0 images | 4 apps, 0 images |"
        );
        assert_eq!(
            lines[3],
            "| rootfs-base | 4m10s | 0.0s | built, key 0123 | cached, key 0123 |"
        );
        assert_eq!(lines[4], "| iso | 3.0s | — |  |  |");
        assert_eq!(lines[5], "| extra | — | 1.0s |  |  |");
        assert_eq!(stage_seconds(&cold, "iso"), Some(3.0));
        assert_eq!(stage_seconds(&cold, "nope"), None);
    }

    #[test]
    fn the_warm_edit_is_one_line_on_top_removed_again_keeping_other_edits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("daemon.rs");
        fs::write(&file, "//! daemon\nfn a() {}\n").unwrap();
        let edit = AgentEdit::apply(&file).unwrap();
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            format!("{AGENT_EDIT_LINE}//! daemon\nfn a() {{}}\n")
        );
        // The developer edits the file while the bench builds.
        let during = format!("{}fn b() {{}}\n", fs::read_to_string(&file).unwrap());
        fs::write(&file, during).unwrap();
        edit.undo().unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "//! daemon\nfn a() {}\nfn b() {}\n");

        // A line left by a killed bench is not stacked, and dropping the
        // edit (an error path) removes it.
        fs::write(&file, format!("{AGENT_EDIT_LINE}fn a() {{}}\n")).unwrap();
        drop(AgentEdit::apply(&file).unwrap());
        assert_eq!(fs::read_to_string(&file).unwrap(), "fn a() {}\n");
    }

    #[test]
    fn a_base_from_the_wrong_place_fails_the_bench() {
        let stages = [stage("rootfs-base", 1.0, "cached, key 0123")];
        assert!(expect_base(&stages, "cached").is_ok());
        let err = expect_base(&stages, "built").unwrap_err().to_string();
        assert!(err.contains("expected a built base rootfs"), "{err}");
        assert!(expect_base(&[], "built").is_err());
    }
}
