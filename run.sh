#!/usr/bin/env bash
# Set up everything hetmerge needs on a fresh Debian/Ubuntu machine, then run the given command in it.
#   ./run.sh snakemake --cores 2 all     # the default experiment, results in results/paper/
#   ./run.sh pytest                      # the test suite
# It installs the runtime dependencies and the test, dev and slurm extras (the test suite runs the linters and a
# throwaway SLURM cluster): the newest versions envs/requirements*.txt allow, or with HETMERGE_LOCKED=1 the tested
# versions of envs/requirements.lock (CPython >= 3.11), hash-checked.
# The virtual environment is cached outside the clone (~/.cache/hetmerge), keyed by those files and the Python
# version, and built from scratch where none exists. Set HETMERGE_VENV to use your own.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ -n "${HETMERGE_LOCKED:-}" ] && [ "${HETMERGE_LOCKED}" != 0 ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "run.sh: envs/requirements.lock is for CPython >= 3.11, not $("$python" --version); set PYTHON, or unset HETMERGE_LOCKED" >&2
    exit 2
  fi
  requirements=(envs/requirements.lock)
  install=(--require-hashes -r envs/requirements.lock)
else
  requirements=(envs/requirements.txt envs/requirements-test.txt envs/requirements-dev.txt envs/requirements-slurm.txt)
  install=()
  for r in "${requirements[@]}"; do install+=(-r "$r"); done
fi
key=$( (cat "${requirements[@]}"; "$python" --version) | sha256sum | cut -c1-16)
venv=${HETMERGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hetmerge/venv-$key}

# System packages: the default dataset (Debian's Fashion-MNIST) and LaTeX for the paper tables.
apt_packages=(dataset-fashion-mnist texlive-latex-base texlive-latex-recommended texlive-latex-extra lmodern latexmk)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${HETMERGE_NO_APT:-}" ]; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -q >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || echo "run.sh: could not install ${missing[*]}; LaTeX tests will skip and data must be provided" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "run.sh: building the environment in $venv (PyTorch is a few GB; this takes minutes once)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q "${install[@]}" >&2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >&2

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
