//! What the tests need: a private Podman service, loopback registries
//! with test images, process supervision, `cargo xtask test`'s
//! environment, the e2e boots of a real ISO in QEMU, and the lint of the
//! CI workflows (zizmor, from a venv of PyPI tools).

pub mod e2e;
pub mod podman;
pub mod procs;
pub mod pytool;
pub mod registries;
pub mod rootless;
pub mod test_env;
pub mod test_images;
pub mod zizmor;
