//! What builds the product: the images stage, the UI base image, the
//! rootfs, the squashfs/bootloader/ISO, the signed update bundle and its
//! signing key, the build report, deterministic file layers, the glibc
//! check, and the flags and progress output the stages share.

pub mod base_image;
pub mod bundle;
pub mod flags;
pub mod glibc;
pub mod images;
pub mod iso;
pub mod keys;
pub mod layers;
pub mod payload;
pub mod progress;
pub mod report;
pub mod rootfs;
pub mod sbom;
