#!/bin/sh
# Create the toolchain sysroot (a root folder with a real C toolchain) from
# Debian 12 packages, and amhello/ (the automake example project) beside it.
#
#   ./make-sysroot.sh [DEST]     DEST defaults to sysroot/ next to this script
#
# The packages are fetched with `apt-get download` (no installation on this
# machine) into a cache folder, checked against the SHA256 apt publishes, and
# unpacked with `dpkg -x`. The package set is the explicit list below: the
# dependency closure of gcc-12, binutils, libc6-dev and make, minus what a C
# build never runs (sanitizer runtimes, Kerberos/RPC libraries, gprofng).
#
#   usr/bin/busybox + one link per applet     sh, coreutils, sed, grep, awk, diff ...
#   gcc, cc, cpp, as, ld, ar, make, ldconfig   the toolchain (cc -> gcc-12)
#   bin, sbin, lib, lib64 -> usr/bin, usr/sbin, usr/lib, usr/lib64   merged /usr
#
# Docs, man pages, locales, gconv modules, lto1/lto-dump, gold and the static
# libraries a dynamic link does not need are left out to keep it small.
#
# Also unpacks amhello-1.0 (automake's example project: doc/amhello-1.0.tar.gz
# in Debian's automake-1.16 source package, which `apt-get source
# --download-only` fetches with a private deb-src list, as the binary
# package does not ship it) into DEST/../amhello: elements/amhello.bst's source.
#
# Idempotent: a complete DEST (its marker file is written last) and amhello/
# are left as they are. Both are made in temporary siblings and renamed into
# place. Cache: $REMEX_DEB_CACHE, default ~/.cache/remex/debs (XDG_CACHE_HOME).
# Needs a Debian 12 amd64 host with its apt lists (apt-get update) and dpkg.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/sysroot}
case "$dest" in /*) ;; *) dest="$PWD/$dest" ;; esac
parent=$(dirname "$dest")
amhello="$parent/amhello"
marker=usr/share/toolchain-sysroot/packages   # written last: "complete"
cache=${REMEX_DEB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remex/debs}

# The toolchain and what its programs load at run time (checked with
# `ld.so --list` on every ELF file in usr/bin, usr/sbin and the gcc folder).
PACKAGES="
busybox-static
make
gcc gcc-12 cpp cpp-12 gcc-12-base libgcc-12-dev
binutils binutils-common binutils-x86-64-linux-gnu libbinutils libctf0 libctf-nobfd0 libjansson4
libc6 libc6-dev libc-bin linux-libc-dev libcrypt1 libcrypt-dev
libgmp10 libmpfr6 libmpc3 libisl23 zlib1g libzstd1 libstdc++6 libgcc-s1
"
AMHELLO_SOURCE=automake-1.16   # the source package holding amhello-1.0.tar.gz

complete() {
    [ -f "$dest/$marker" ] && [ -x "$dest/usr/bin/gcc-12" ] && [ -d "$dest/proc" ] \
        && [ "$(readlink "$dest/bin" 2>/dev/null)" = usr/bin ]
}
if complete && [ -f "$amhello/configure" ]; then
    exit 0
fi

for tool in apt-get dpkg sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "make-sysroot.sh: $tool not found: this script needs a Debian 12 host" >&2
        exit 1
    fi
done
if [ "$(dpkg --print-architecture)" != amd64 ]; then
    echo "make-sysroot.sh: the package list is for amd64, this host is $(dpkg --print-architecture)" >&2
    exit 1
fi

# Download what the cache lacks. --print-uris resolves each name to apt's
# candidate version and prints "'URI' FILE SIZE SHA256:HEX" without fetching
# (it leaves out files present in the current folder, hence an empty one).
mkdir -p "$cache" "$parent"
empty=$(mktemp -d)

# shellcheck disable=SC2086  # word splitting of the package lists is wanted
uris=$(cd "$empty" && apt-get download --print-uris $PACKAGES) || {
    echo "make-sysroot.sh: apt-get could not resolve the packages: run apt-get update" >&2
    exit 1
}
rmdir "$empty"
missing=$(echo "$uris" | while read -r _uri file _size hash; do
    [ -n "$file" ] || continue
    if [ ! -f "$cache/$file" ] \
        || [ "$(sha256sum "$cache/$file" | cut -d' ' -f1)" != "${hash#SHA256:}" ]; then
        rm -f "$cache/$file"   # a partial or corrupt earlier download
        printf '%s\n' "${file%%_*}"
    fi
done)
if [ -n "$missing" ]; then
    # apt-get download writes into the current folder; as root it warns that
    # the _apt user cannot write there, which is harmless.
    # shellcheck disable=SC2086
    (cd "$cache" && apt-get download -q $missing 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
fi
debs=$(echo "$uris" | while read -r _uri file _size hash; do
    [ -n "$file" ] || continue
    if [ "$(sha256sum "$cache/$file" | cut -d' ' -f1)" != "${hash#SHA256:}" ]; then
        echo "make-sysroot.sh: $cache/$file: bad or missing download" >&2
        exit 1
    fi
    printf '%s\n' "$file"
done)

work=$(mktemp -d "$parent/.toolchain-sysroot.XXXXXX")
trap 'rm -rf "$work"' EXIT

if ! complete; then
    root="$work/root"
    mkdir -p "$root"
    for file in $debs; do
        dpkg -x "$cache/$file" "$root"
    done
    # Merged /usr: Debian 12 packages still ship /bin, /lib ... content, so
    # move it under usr/ and leave links (as usrmerge does).
    for top in bin sbin lib lib64; do
        if [ -d "$root/$top" ] && [ ! -L "$root/$top" ]; then
            mkdir -p "$root/usr/$top"
            cp -a "$root/$top/." "$root/usr/$top/"
            rm -rf "${root:?}/$top"
        fi
        mkdir -p "$root/usr/$top"
        ln -s "usr/$top" "$root/$top"
    done

    # Leave out what a C build does not use.
    rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" \
        "$root/usr/share/locale" "$root/usr/share/lintian" "$root/usr/share/bug" \
        "$root/usr/share/gcc" "$root/usr/share/gdb" "$root/usr/lib/x86_64-linux-gnu/gconv" \
        "$root/usr/lib/x86_64-linux-gnu/ldscripts" "$root/usr/share/busybox" \
        "$root/usr/libexec/getconf" "$root/usr/lib/x86_64-linux-gnu/bfd-plugins" \
        "$root/usr/share/initramfs-tools" "$root/etc/gprofng.rc" "$root/etc/default" \
        "$root/usr/lib/gold-ld"
    gcclib="$root/usr/lib/gcc/x86_64-linux-gnu/12"
    # lto1 (31 MB) only runs for -flto; the sanitizer, OpenMP, TM and
    # quadmath archives only for their -f options.
    rm -f "$gcclib/lto1" "$gcclib"/libasan*.a "$gcclib"/libtsan*.a "$gcclib"/liblsan*.a \
        "$gcclib"/libubsan*.a "$gcclib"/libhwasan*.a "$gcclib"/libquadmath.a "$gcclib"/libgomp.a \
        "$gcclib"/libitm.a "$gcclib"/libatomic.a \
        "$root/usr/bin/lto-dump-12" "$root/usr/bin/x86_64-linux-gnu-lto-dump-12" \
        "$root/usr/bin/x86_64-linux-gnu-ld.gold" "$root/usr/bin/ld.gold" \
        "$root/usr/bin/x86_64-linux-gnu-dwp" "$root/usr/bin/dwp" \
        "$root/usr/bin/x86_64-linux-gnu-gp-"* "$root/usr/bin/gp-"* \
        "$root/usr/bin/x86_64-linux-gnu-gprofng" "$root/usr/bin/gprofng"
    # Static C library parts: a dynamic link needs only libc_nonshared.a
    # (libgcc.a and libgcc_eh.a live under usr/lib/gcc and stay).
    find "$root/usr/lib/x86_64-linux-gnu" -maxdepth 1 -name '*.a' \
        ! -name libc_nonshared.a -exec rm -f {} +
    # libc-bin: keep ldconfig (for integration commands) and ld.so.conf.
    for tool in catchsegv getconf getent iconv ldd locale localedef pldd tzselect zdump; do
        rm -f "$root/usr/bin/$tool"
    done
    rm -f "$root/usr/sbin/iconvconfig" "$root/usr/sbin/zic" "$root/usr/bin/sprof"

    # Links to what was left out (gold, lto-dump, the sanitizer runtimes)
    # would dangle; links to links go in later rounds.
    while [ -n "$(find "$root" -type l ! -lname '/*' -xtype l -print -delete)" ]; do :; done

    # Busybox applets where no real program is installed (make, gcc ... win).
    "$root/usr/bin/busybox" --list | LC_ALL=C sort -u | while read -r applet; do
        case "$applet" in
            ''|busybox|*/*) ;;
            *) [ -e "$root/usr/bin/$applet" ] || [ -L "$root/usr/bin/$applet" ] \
                || ln -s busybox "$root/usr/bin/$applet" ;;
        esac
    done
    # The links Debian's maintainer scripts (update-alternatives) would make.
    [ -e "$root/usr/bin/cc" ] || ln -s gcc "$root/usr/bin/cc"
    [ -e "$root/usr/bin/c99" ] || ln -s c99-gcc "$root/usr/bin/c99"
    [ -e "$root/usr/bin/awk" ] || ln -s busybox "$root/usr/bin/awk"
    # dev/ and proc/: a sandbox mounts over them. Without them here,
    # BuildStream's bubblewrap sandbox creates them during integration and a
    # compose then counts them as files the integration added.
    mkdir -p "$root/etc" "$root/tmp" "$root/var/tmp" "$root/dev" "$root/proc"
    chmod 1777 "$root/tmp" "$root/var/tmp"
    printf 'include /etc/ld.so.conf.d/*.conf\n' > "$root/etc/ld.so.conf"
    # No passwd/group: BuildStream and remex run builds as uid/gid 0.

    mkdir -p "$root/$(dirname "$marker")"
    for file in $debs; do
        dpkg-deb -f "$cache/$file" Package Version | paste -sd= -
    done | sed 's/^Package: //; s/=Version: /=/' | LC_ALL=C sort > "$root/$marker"
    chmod 0755 "$root"
    rm -rf "$dest"
    mv "$root" "$dest"
fi

if [ ! -f "$amhello/configure" ]; then
    orig=$(ls "$cache/$AMHELLO_SOURCE"_*.orig.tar.* 2>/dev/null | head -n 1 || true)
    if [ -z "$orig" ]; then
        # A private apt state: the deb-src index goes to the cache, the
        # machine's own apt configuration is not touched.
        apt_src="$cache/apt-src"
        rm -rf "$apt_src/sources.list.d"
        mkdir -p "$apt_src/lists/partial" "$apt_src/cache/archives/partial" "$work/src" \
            "$apt_src/sources.list.d"
        # deb-src entries for the archives this machine's apt already uses:
        # its own sources, one-line and deb822 forms, with the type changed.
        : > "$apt_src/sources.list"
        for list in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            if [ -f "$list" ]; then
                sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' "$list" >> "$apt_src/sources.list"
            fi
        done
        for list in /etc/apt/sources.list.d/*.sources; do
            if [ -f "$list" ]; then
                sed 's/^Types:.*/Types: deb-src/' "$list" \
                    > "$apt_src/sources.list.d/$(basename "$list")"
            fi
        done
        set -- -q -o Dir::Etc::SourceList="$apt_src/sources.list" \
            -o Dir::Etc::SourceParts="$apt_src/sources.list.d" \
            -o Dir::State::Lists="$apt_src/lists" -o Dir::Cache="$apt_src/cache"
        apt-get "$@" update 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 \
            || true
        # Verified against the signed index; no unpacking (no dpkg-source).
        (cd "$work/src" && apt-get "$@" source --download-only "$AMHELLO_SOURCE" >/dev/null)
        orig=$(ls "$work/src/$AMHELLO_SOURCE"_*.orig.tar.* | head -n 1)
        cp "$orig" "$cache/"
        orig="$cache/$(basename "$orig")"
    fi
    tar -xf "$orig" -C "$work" --wildcards '*/doc/amhello-1.0.tar.gz'
    mkdir -p "$work/amhello"
    tar -xzf "$work"/*/doc/amhello-1.0.tar.gz -C "$work/amhello" \
        --strip-components=1 --no-same-owner
    rm -rf "$amhello"
    mv "$work/amhello" "$amhello"
fi
