#!/bin/sh
# Build examples/toolchain with BuildStream (the reference remex is compared
# with) and check every element out, as recorded in EXPECTED.md.
#
#   ./bst-build.sh [OUT [BST-GLOBAL-OPTION...]]
#   ./bst-build.sh out/bst-debug -o build-type debug -o loud True
#
# OUT (default: out/toolchain-bst under the repository) receives:
#   home/                  bst's private HOME, XDG cache (artifacts) and config
#   checkout/ELEMENT/      `bst artifact checkout --deps none --no-integrate` of each
#   checkout/greet-run-integrated/   `--deps run --integrate greet.bst`
#   show/                  `bst show --format` outputs (vars, env, config, keys)
#   files/ELEMENT.txt      the sorted paths of each checkout (`find`, with types);
#   files/ELEMENT.sha256, files/ELEMENT.links   file digests, symlink targets
#
# bst runs locally, sandboxed with bubblewrap (bwrap on PATH); it never reads
# the user's BuildStream config or cache. BST names the bst to run (default:
# the repository's .venv/bin/bst, else bst on PATH).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/out/toolchain-bst}
[ $# -gt 0 ] && shift
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
if [ -z "${BST:-}" ]; then
    if [ -x "$repo/.venv/bin/bst" ]; then BST="$repo/.venv/bin/bst"; else BST=bst; fi
fi

ELEMENTS="base.bst amhello.bst libgreet.bst greet.bst libgreet-runtime.bst app.bst report.bst"

"$here/make-sysroot.sh"

mkdir -p "$out/home/home" "$out/home/cache" "$out/home/config" "$out/home/tmp" \
    "$out/show" "$out/files"
cat > "$out/home/buildstream.conf" <<'EOF'
scheduler:
  builders: 2
  fetchers: 2
  on-error: quit
EOF

# Nothing of the caller's BuildStream environment leaks in.
bst() {
    env -u BST_FORCE_SANDBOX -u XDG_DATA_HOME -u XDG_RUNTIME_DIR \
        HOME="$out/home/home" XDG_CACHE_HOME="$out/home/cache" \
        XDG_CONFIG_HOME="$out/home/config" TMPDIR="$out/home/tmp" \
        "$BST" --no-interactive --no-colors --config "$out/home/buildstream.conf" \
        --directory "$here" "$@"
}

start=$(date +%s)
bst "$@" build report.bst
end=$(date +%s)
echo "bst build: $((end - start)) s" | tee "$out/build-time"

rm -rf "$out/checkout"
for element in $ELEMENTS; do
    name=${element%.bst}
    # --no-integrate: checkout integrates by default, which needs a shell
    # in the checked out tree (--deps none of libgreet.bst has none).
    bst "$@" artifact checkout --deps none --no-integrate "$element" \
        --directory "$out/checkout/$name"
done
bst "$@" artifact checkout --deps run --integrate greet.bst \
    --directory "$out/checkout/greet-run-integrated"

# Paths with a type letter (f file, l symlink, d folder), sorted bytewise;
# the SHA-256 of each file and the target of each symlink.
for dir in "$out/checkout"/*; do
    name=$(basename "$dir")
    (cd "$dir" && find . -mindepth 1 -printf '%y %P\n' | LC_ALL=C sort -k2) \
        > "$out/files/$name.txt"
    (cd "$dir" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -r -d '\n' sha256sum) \
        > "$out/files/$name.sha256"
    (cd "$dir" && find . -type l -printf '%P -> %l\n' | LC_ALL=C sort) \
        > "$out/files/$name.links"
done

# `bst show` facts, all elements in one call per format.
bst "$@" show --deps all --format '%{name} %{key}' report.bst > "$out/show/keys.txt"
bst "$@" show --deps all --format '%{name} %{full-key}' report.bst > "$out/show/full-keys.txt"
for fmt in vars env config public; do
    for element in $ELEMENTS; do
        bst "$@" show --deps none --format "%{$fmt}" "$element" \
            > "$out/show/${element%.bst}.$fmt.yaml"
    done
done
echo "bst-build.sh: results in $out"
