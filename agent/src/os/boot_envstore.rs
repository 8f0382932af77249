//! [`EnvAccess`] over the boot environment's store (`bootenv.rs`): what
//! boot-prepare and mark-good read and change in `<esp>/grub/bootenv.{0,1}`.

use anyhow::Context as _;

use super::boot::EnvAccess;
use super::bootenv::{BootEnv, EnvStore, SlotName};

impl EnvAccess for EnvStore {
    fn read_env(&self) -> anyhow::Result<BootEnv> {
        self.read()
            .with_context(|| format!("cannot read the boot environment in {}", self.dir().display()))
    }

    /// `set_bad`, and the trial flag and tries cleared: the rollback is
    /// found once.
    fn retire_trial(&self, s: SlotName) -> anyhow::Result<()> {
        self.update(|env| {
            env.set_bad(s);
            let b = env.slot_mut(s);
            b.trial = false;
            b.tries = 0;
        })
        .with_context(|| format!("cannot write the boot environment in {}", self.dir().display()))?;
        Ok(())
    }

    fn commit(&self, s: SlotName) -> anyhow::Result<()> {
        self.update(|env| env.set_good(s))
            .with_context(|| format!("cannot write the boot environment in {}", self.dir().display()))?;
        Ok(())
    }
}
