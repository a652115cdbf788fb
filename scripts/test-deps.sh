#!/usr/bin/env bash
# Installs, when missing, what the test suite needs besides the Rust toolchain.
# Safe to run repeatedly. Nothing is needed yet beyond rustfmt and clippy.
set -euo pipefail
if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

# tests/integration/deploy.rs runs scripts/validate-manifests.py, which needs
# Python 3 and kubernetes-validate (it bundles the Kubernetes API schemas, so
# validation is offline). kubectl is used when the machine has it, to
# cross-check the script's own kustomize renderer; nothing installs it.
KUBERNETES_VALIDATE_VERSION=1.37.0
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v python3 >/dev/null 2>&1; then apt_install python3; fi
if ! python3 -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
  # PIP_BREAK_SYSTEM_PACKAGES: Debian's own python3 refuses pip installs without it.
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# tests/integration/shared_cache.rs and shared_topologies.rs run Debian's
# redis-server (started by the tests on free ports, also as a sentinel with
# `--sentinel`; the test helper installs it too when it is missing), and
# redis-cli (package redis-tools, a dependency of redis-server) to create a
# Redis Cluster.
if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
if ! command -v redis-cli >/dev/null 2>&1; then apt_install redis-tools; fi
