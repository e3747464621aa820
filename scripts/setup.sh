#!/usr/bin/env bash
# Set up remex on a fresh Debian/Ubuntu machine (as root, or with sudo) and
# prove it works: installs the Debian packages and a virtualenv in .venv, then
# runs one real action remotely on a throwaway buildbox-casd.
#
#   bash scripts/setup.sh            # install + demo
#   REMEX_SKIP_DEMO=1 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# redis-server: broker and result backend; bubblewrap: the sandbox buildbox-run
# uses; busybox-static: the static busybox of the action sysroot; postgresql:
# BuildGrid's scheduler database; fuse3: fusermount3, as buildbox-casd (root)
# stages inputs through FUSE; python3-venv: `python3 -m venv` on Debian.
DEBIAN_PACKAGES=(redis-server bubblewrap busybox-static postgresql fuse3 python3-venv ca-certificates)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  # Installing may start system-wide servers; remex and its tests start their
  # own on ports they pick, so stop these to save memory (harmless if absent).
  if command -v service >/dev/null 2>&1; then
    $SUDO service redis-server stop >/dev/null 2>&1 || true
    $SUDO service postgresql stop >/dev/null 2>&1 || true
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "==> pip install -e '.[local,test,dev]'"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[local,test,dev]'

if [ "${REMEX_SKIP_DEMO:-0}" != 1 ]; then
  echo "==> running one action remotely on buildbox-casd"
  .venv/bin/python -m examples.remote_action out/remote-action
fi
