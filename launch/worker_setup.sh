#!/usr/bin/env bash
# Prepares one TPU VM worker for fmjax: a Python >= 3.11 virtual environment in ./.venv.
# `fmjax launch setup` runs it on every worker from the code directory, then installs fmjax[tpu]
# into the venv. Safe to run again: a working venv is kept, and one without pip is made again.
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

apt_install() {
  # Right after boot unattended-upgrades may hold the dpkg lock: wait for it rather than fail.
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@"
}

# Debian and Ubuntu ship venv's pip (ensurepip) in a separate pythonX.Y-venv package: without it
# `-m venv` fails halfway and leaves a bin/python with no pip, which an existence check would keep
# forever. So the test of a venv is that its pip runs.
venv_works() {
  .venv/bin/python -m pip --version >/dev/null 2>&1
}

make_venv() {
  rm -rf .venv
  "$1" -m venv .venv && venv_works
}

if ! venv_works; then
  if [ -e .venv ]; then
    echo "worker $(hostname): .venv has no working pip (made without its python3.X-venv package?): making it again"
  fi
  if ! py=$(pick_python); then
    # TPU VM images are Ubuntu 22.04, whose python3 is 3.10; its universe archive has 3.11.
    apt_install python3.11 python3.11-venv
    py=python3.11
  fi
  if ! make_venv "$py" >/dev/null 2>&1; then
    # python3 -> python3-venv, python3.12 -> python3.12-venv.
    apt_install "$py-venv"
    if ! make_venv "$py"; then
      echo "worker $(hostname): $py -m venv .venv made no working pip even with $py-venv installed" >&2
      exit 1
    fi
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "worker $(hostname): $(.venv/bin/python --version) in $(pwd)/.venv"
