#!/bin/sh
# Create DEST (default: sysroot/ next to this script, where
# elements/base.bst imports it from): the root folder every build of this
# project runs in.
#
#   make-sysroot.sh [DEST]
#
# BUSYBOX names the static busybox to copy (default /bin/busybox, from
# Debian's busybox-static).
#
#   usr/bin/busybox          copy of Debian's static busybox (busybox-static)
#   usr/bin/<applet> -> busybox   one symlink per `busybox --list` entry
#   bin -> usr/bin, sbin -> usr/bin   merged /usr, as on Debian
#   etc/, tmp/               empty folders
#
# Idempotent: a complete sysroot is left as it is. The sysroot is made in a
# temporary sibling folder and renamed into place, so an interrupted run never
# leaves a half-made sysroot.
set -eu

if [ $# -gt 1 ]; then
    echo "usage: make-sysroot.sh [DEST]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/sysroot}
busybox=${BUSYBOX:-/bin/busybox}
marker=usr/share/hello-sysroot/busybox-version   # written last

if [ -f "$dest/$marker" ] && [ -f "$dest/usr/bin/busybox" ] \
    && [ "$(readlink "$dest/bin" 2>/dev/null)" = usr/bin ]; then
    exit 0
fi

if [ ! -x "$busybox" ]; then
    echo "make-sysroot.sh: $busybox not found: apt-get install busybox-static" >&2
    exit 1
fi
if ! "$busybox" --list >/dev/null 2>&1; then
    echo "make-sysroot.sh: $busybox --list failed: is it Debian's busybox-static?" >&2
    exit 1
fi

# The work folder is a sibling of DEST, so the final rename stays on one filesystem.
parent=$(dirname "$dest")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.sysroot.XXXXXX")
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/usr/bin" "$work/etc" "$work/tmp" "$work/$(dirname "$marker")"
cp "$busybox" "$work/usr/bin/busybox"
chmod 0755 "$work/usr/bin/busybox"
"$busybox" --list | LC_ALL=C sort -u | while read -r applet; do
    case "$applet" in
        ''|busybox|*/*) ;;
        *) ln -s busybox "$work/usr/bin/$applet" ;;
    esac
done
ln -s usr/bin "$work/bin"
ln -s usr/bin "$work/sbin"
"$busybox" 2>/dev/null | head -n 1 > "$work/$marker" || true
chmod 0755 "$work"

rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
