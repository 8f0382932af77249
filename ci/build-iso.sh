#!/usr/bin/env bash
# Builds the flashable ISO the way CI does, on any machine: inside Debian 12
# (the target's own glibc) with a Rust toolchain from rustup.
#
#   ci/build-iso.sh [test|iso|all]     (default: all)
#
# Run it as root in a Debian 12 system or container (privileged: mmdebstrap
# chroots, the tests run Podman and mount loop devices). Outputs:
# target/iso/archipelago-<version>-amd64.iso, the update bundle (.raucb),
# SHA256SUMS and SHA256SUMS.sig, build-report.json, sbom.spdx.json. The
# release key comes in as ARCHY_SIGN_KEY/ARCHY_SIGN_CERT (files) and the
# version as ARCHY_RELEASE_VERSION, read by `cargo xtask iso` itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step=${1:-all}
case "$step" in test|iso|all) ;; *) echo "usage: $0 [test|iso|all]" >&2; exit 2 ;; esac

if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "ci/build-iso.sh: run this in Debian 12 (bookworm): the agent must link against the node's glibc" >&2
    exit 1
fi

# The packages cargo needs to build; every stage installs its own tools.
export DEBIAN_FRONTEND=noninteractive
if ! command -v cargo >/dev/null; then
    apt-get update
    apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config git
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
export PATH="$HOME/.cargo/bin:$PATH"

# A fixed time stamp makes the ISO reproducible: the commit's time.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

if [ "$step" = test ] || [ "$step" = all ]; then
    cargo xtask test
fi
if [ "$step" = iso ] || [ "$step" = all ]; then
    # iso runs every stage, the images pull included.
    cargo xtask iso
    ls -l target/iso
fi
