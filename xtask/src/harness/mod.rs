//! What the tests need: a private Podman service, loopback registries
//! with test images, process supervision, `cargo xtask test`'s
//! environment, and the e2e boots of a real ISO in QEMU.

pub mod e2e;
pub mod podman;
pub mod procs;
pub mod registries;
pub mod rootless;
pub mod test_env;
pub mod test_images;
