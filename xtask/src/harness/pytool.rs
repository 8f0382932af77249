//! Python tools from PyPI that the checks run (zizmor, the SPDX validator),
//! each in a virtual environment of its own under `target/<name>/`,
//! installed once at a pinned version and reused offline afterwards.
//!
//! Why a venv and not Debian's packages: neither tool is packaged for
//! Debian 12. Why under `target/`: it is rebuilt output, like everything
//! else there, and `cargo clean` removes it. A venv is installed again when
//! its requirements change (the file `installed.txt` holds the ones it was
//! made from). Tests running side by side take a lock on
//! `target/<name>.lock` so that one installs and the others wait.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::pipeline::flags;
use crate::tools;

/// A command-line tool from PyPI.
#[derive(Debug, Clone, Copy)]
pub struct PyTool {
    /// The venv's folder under target/.
    pub name: &'static str,
    /// A pip requirements file: pinned versions, with `--hash` where the
    /// whole set can carry them (pip then refuses any other file).
    pub requirements: &'static str,
    /// The executable in the venv's bin/.
    pub bin: &'static str,
}

const MARKER: &str = "installed.txt";

impl PyTool {
    pub fn venv(&self, root: &Path) -> PathBuf {
        flags::target_dir(root).join(self.name)
    }

    /// The tool's executable, installing the venv first unless it holds
    /// exactly these requirements already.
    pub fn ensure(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let venv = self.venv(root);
        let bin = venv.join("bin").join(self.bin);
        let parent = venv
            .parent()
            .with_context(|| format!("{} has no parent folder", venv.display()))?;
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let lock_path = parent.join(format!("{}.lock", self.name));
        let lock = fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if self.is_installed(&venv, &bin) {
            return Ok(bin);
        }
        let sh = Shell::new().context("creating a shell")?;
        tools::ensure(&sh, tools::PYTHON_VENV)?;
        self.install(&sh, &venv)?;
        if !bin.is_file() {
            bail!(
                "installing {} into {} did not make {}",
                self.name,
                venv.display(),
                bin.display()
            );
        }
        Ok(bin)
    }

    fn is_installed(&self, venv: &Path, bin: &Path) -> bool {
        bin.is_file() && fs::read_to_string(venv.join(MARKER)).is_ok_and(|r| r == self.requirements)
    }

    fn install(&self, sh: &Shell, venv: &Path) -> anyhow::Result<()> {
        if venv.exists() {
            fs::remove_dir_all(venv).with_context(|| format!("removing the old venv {}", venv.display()))?;
        }
        eprintln!("xtask: installing {} from PyPI into {}", self.name, venv.display());
        // Debian's python3 on PATH first: a pyenv or other python works too.
        cmd!(sh, "python3 -m venv {venv}").quiet().run().with_context(|| {
            format!(
                "creating the venv {} (`python3 -m venv` needs Debian's package python3-venv)",
                venv.display()
            )
        })?;
        let requirements = venv.join("requirements.txt");
        fs::write(&requirements, self.requirements).with_context(|| format!("writing {}", requirements.display()))?;
        let pip = venv.join("bin/pip");
        let out = cmd!(
            sh,
            "{pip} install --disable-pip-version-check --no-input --quiet -r {requirements}"
        )
        .quiet()
        .ignore_status()
        .output()
        .with_context(|| format!("running {}", pip.display()))?;
        if !out.status.success() {
            bail!(
                "pip could not install {} ({}) from {}:\n{}",
                self.name,
                out.status,
                requirements.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let marker = venv.join(MARKER);
        fs::write(&marker, self.requirements).with_context(|| format!("writing {}", marker.display()))
    }
}
