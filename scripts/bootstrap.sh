#!/usr/bin/env bash
# Install everything Ferry needs on a fresh Debian machine: system packages (apt-get) and a virtualenv
# (.venv) with Ferry installed in editable mode, its Cython kernels built. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    qemu-utils libnbd-bin fuse3 openssh-server openssh-client netcat-openbsd e2fsprogs
    util-linux procps time borgbackup restic
    build-essential pkg-config libssl-dev libzstd-dev libcurl4-openssl-dev libxml2-dev python3-dev python3-venv
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing system packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip setuptools wheel
fi

# Reinstall when the packaging or the Cython sources change.
stamp=.venv/.ferry-installed
shopt -s nullglob
want=$(cat pyproject.toml setup.py ext/*.pyx ext/*.pxd ext/*.h | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing Ferry and its Python dependencies into .venv"
    .venv/bin/pip install -q "cython>=3.0" "setuptools>=77" wheel
    .venv/bin/pip install -q --no-build-isolation -e ".[dev]"
    echo "$want" > "$stamp"
fi
