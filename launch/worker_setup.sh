#!/usr/bin/env bash
# Prepares one TPU VM worker for fmjax: a Python >= 3.11 virtual environment in ./.venv.
# `fmjax launch setup` runs it on every worker from the code directory, then installs fmjax[tpu]
# into the venv. Safe to run again: an existing venv is kept.
set -euo pipefail

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! py=$(pick_python); then
    # TPU VM images are Ubuntu 22.04, whose python3 is 3.10; its universe archive has 3.11.
    # Right after boot unattended-upgrades may hold the dpkg lock: wait for it rather than fail.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv
    py=python3.11
  fi
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "worker $(hostname): $(.venv/bin/python --version) in $(pwd)/.venv"
