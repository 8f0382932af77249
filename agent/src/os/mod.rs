//! The node's own OS on its own disk (`docs/disk-layout.md`): the A/B
//! disk layout and the installer's choice of disk.
//!
//! `layout.rs` plans and recognises the partition table (pure);
//! `disks.rs` decides which disks the installer offers and which one an
//! unattended install takes (pure, with one gathering function);
//! `partition.rs` writes the table and file systems (effects, Debian's
//! `sfdisk`, `mkfs.vfat` and `mkfs.ext4`); `release.rs` is `release.json`,
//! one type for the ISO, the slots and xtask; `slot.rs` copies a verified
//! release into a slot and reads it back.
//!
//! The installer (`archy-agent os install`, `install.rs`) reads the kernel
//! command line (`cmdline.rs`), the `ARCHY-CONF` stick and the pasted key
//! (through `ssh::conf` and `ssh::keys`, strictly), makes or keeps the machine-id
//! (`machine_id.rs`) and installs GRUB with its `grub.cfg` (`grub.rs`) and
//! the two-copy boot environment it counts boots in (`bootenv.rs`).
//! `medium.rs` is `archy-agent os check-medium`, run early on every boot
//! from an installed disk.
//!
//! `update/` is the OS update: RAUC's configuration and handlers, the
//! root helper and `archy-agent os update` (`docs/updates.md`).

pub mod boot;
pub mod boot_envstore;
pub mod bootenv;
pub mod check;
pub mod cmdline;
pub mod commands;
pub mod disks;
pub mod grub;
pub mod install;
pub mod layout;
pub mod life;
pub mod machine_id;
pub mod medium;
pub mod partition;
pub mod records;
pub mod release;
pub mod slot;
pub mod update;
