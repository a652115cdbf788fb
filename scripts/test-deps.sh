#!/usr/bin/env bash
# Installs, when missing, what the test suite needs besides the Rust toolchain.
# Safe to run repeatedly. Nothing is needed yet beyond rustfmt and clippy.
set -euo pipefail
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi
