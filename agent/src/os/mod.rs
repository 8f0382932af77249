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

pub mod commands;
pub mod disks;
pub mod layout;
pub mod partition;
pub mod release;
pub mod slot;
