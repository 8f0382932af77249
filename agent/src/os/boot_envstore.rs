//! [`EnvAccess`] over the boot environment's store (`bootenv.rs`): what
//! boot-prepare and mark-good read and change in `<esp>/grub/bootenv.{0,1}`.
//!
//! INTEGRATOR: this file is not yet in `os/mod.rs` on branch i16-life
//! (H1's `bootenv` was not merged when it was written). After merging
//! i16-boot: add `pub mod boot_envstore;` to `os/mod.rs`, and in
//! `os/life.rs` make `env_store` return `super::bootenv::EnvStore::new(grub_dir)`
//! (and delete `NoEnvStore`). Ideally `records::Slot` becomes
//! `pub use super::bootenv::SlotName as Slot;` (it has the same serde
//! form, "A"/"B"), and the two `slot()` conversions below go.

use anyhow::Context as _;

use super::boot::{EnvAccess, EnvFacts, EnvSlot};
use super::bootenv::{EnvStore, SlotBoot, SlotName};
use super::records::Slot;

fn name(s: Slot) -> SlotName {
    match s {
        Slot::A => SlotName::A,
        Slot::B => SlotName::B,
    }
}

fn slot(s: SlotName) -> Slot {
    match s {
        SlotName::A => Slot::A,
        SlotName::B => Slot::B,
    }
}

fn env_slot(s: &SlotBoot) -> EnvSlot {
    EnvSlot {
        ok: s.ok,
        trial: s.trial,
        tries: s.tries,
    }
}

impl EnvAccess for EnvStore {
    fn read_env(&self) -> anyhow::Result<EnvFacts> {
        let env = self
            .read()
            .with_context(|| format!("cannot read the boot environment in {}", self.dir().display()))?;
        Ok(EnvFacts {
            a: env_slot(env.slot(SlotName::A)),
            b: env_slot(env.slot(SlotName::B)),
            committed: slot(env.committed),
        })
    }

    fn retire_trial(&self, s: Slot) -> anyhow::Result<()> {
        let mut env = self.read()?;
        env.set_bad(name(s));
        let b = env.slot_mut(name(s));
        b.trial = false;
        b.tries = 0;
        self.write(&env)
            .with_context(|| format!("cannot write the boot environment in {}", self.dir().display()))?;
        Ok(())
    }

    fn commit(&self, s: Slot) -> anyhow::Result<()> {
        let mut env = self.read()?;
        env.set_good(name(s));
        self.write(&env)
            .with_context(|| format!("cannot write the boot environment in {}", self.dir().display()))?;
        Ok(())
    }
}
