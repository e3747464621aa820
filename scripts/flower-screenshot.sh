#!/usr/bin/env bash
# Take docs/img/flower-tasks.png: Flower's tasks page after a build of
# examples/hello on a private embedded stack (remex up --flower), with
# headless Chromium from Debian (apt-get install chromium).
#
#   bash scripts/flower-screenshot.sh [OUTPUT.png]
#
# Needs what scripts/setup.sh installs (.venv, redis-server, bubblewrap,
# busybox-static). Touches no stack of the user's: everything lives in a
# temporary folder that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-docs/img/flower-tasks.png}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
  echo "chromium is not installed: apt-get install chromium" >&2
  exit 2
fi

TMP=$(mktemp -d)
export REMEX_STACK_DIR="$TMP/stack"   # a stack of this script's own
export REMEX_CONFIG=/dev/null         # no user config
export REMEX_CAS_DIR="$TMP/cli-cas"   # the CLI's local CAS
cleanup() {
  .venv/bin/remex down >/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

bash examples/hello/make-sysroot.sh
.venv/bin/remex up --detach --workers 2 --flower
.venv/bin/remex build -C examples/hello app.bst
sleep 1   # the last task events reach Flower a moment after the build ends

# Flower's address and password, as `remex up` recorded them.
read -r FLOWER_HOSTPORT FLOWER_USER FLOWER_PASSWORD < <(.venv/bin/python - <<'EOF'
import json, os, pathlib
state = json.loads((pathlib.Path(os.environ["REMEX_STACK_DIR"]) / "stack.json").read_text())
flower = state["flower"]
password = pathlib.Path(flower["password_file"]).read_text().strip()
print(flower["url"].removeprefix("http://"), flower["user"], password)
EOF
)

mkdir -p "$(dirname "$OUT")"
# Basic auth goes in the URL (Chromium sends it on the page's own requests too).
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$TMP/chromium" --window-size=1400,900 --hide-scrollbars \
  --virtual-time-budget=5000 --screenshot="$OUT" \
  "http://$FLOWER_USER:$FLOWER_PASSWORD@$FLOWER_HOSTPORT/tasks" 2>"$TMP/chromium.log" || {
  cat "$TMP/chromium.log" >&2
  exit 1
}
echo "==> $OUT ($(stat -c %s "$OUT") bytes)"
