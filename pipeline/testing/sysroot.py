"""A minimal sysroot for actions: Debian's static busybox plus one link per applet.

Layout (merged /usr, the links point the same way as on Debian)::

    usr/bin/busybox         copy of /bin/busybox (Debian package busybox-static)
    usr/bin/<applet>  ->  busybox      one symlink per ``busybox --list`` entry
    usr/share/remex/busybox-sysroot    marker: busybox version, written last
    bin  -> usr/bin
    sbin -> usr/bin
    etc/  tmp/              empty folders

Plain Python (no pytest), so benchmarks can use it too.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BUSYBOX", "SysrootError", "is_complete_sysroot", "make_busybox_sysroot"]

BUSYBOX = Path("/bin/busybox")
# Written last: its presence means the sysroot is complete.
_MARKER = "usr/share/remex/busybox-sysroot"


class SysrootError(RuntimeError):
    """The sysroot cannot be built (busybox missing or not static)."""


def _has_interpreter(path: Path) -> bool:
    """True if the ELF file ``path`` asks for a dynamic loader (PT_INTERP)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            raise SysrootError(f"{path} is not an ELF executable")
        is64 = header[4] == 2
        endian = "<" if header[5] == 1 else ">"
        if is64:
            (phoff,) = struct.unpack_from(endian + "Q", header, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
        else:
            (phoff,) = struct.unpack_from(endian + "I", header, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x2A)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return True
    return False


def _busybox(source: Path) -> Path:
    if not source.is_file():
        raise SysrootError(
            f"{source} not found: install the Debian package 'busybox-static' "
            "(apt-get install busybox-static)"
        )
    if _has_interpreter(source):
        raise SysrootError(
            f"{source} is dynamically linked (Debian package 'busybox'?): it cannot run "
            "in an empty sysroot; install the Debian package 'busybox-static' instead"
        )
    return source


def _applets(busybox: Path) -> list[str]:
    result = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    names = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
    return [name for name in names if name != "busybox" and "/" not in name]


def is_complete_sysroot(dest: str | os.PathLike[str]) -> bool:
    """True if ``dest`` holds a sysroot finished by :func:`make_busybox_sysroot`."""
    root = Path(dest)
    return (
        (root / _MARKER).is_file()
        and (root / "usr/bin/busybox").is_file()
        and (root / "bin").is_symlink()
        and os.readlink(root / "bin") == "usr/bin"
        and (root / "sbin").is_symlink()
    )


def make_busybox_sysroot(
    dest: str | os.PathLike[str], busybox: str | os.PathLike[str] = BUSYBOX
) -> Path:
    """Build the busybox sysroot at ``dest`` and return ``dest`` as a Path.

    If ``dest`` already holds a complete sysroot it is returned as is.  The
    sysroot is built in a sibling folder and renamed into place, so an
    interrupted build never leaves a half-made ``dest``; ``dest`` may exist
    beforehand only as an empty folder (as ``tmp_path_factory.mktemp`` makes).
    """
    root = Path(dest).absolute()
    if is_complete_sysroot(root):
        return root
    source = _busybox(Path(busybox))
    applets = _applets(source)
    root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        usr_bin = build / "usr" / "bin"
        usr_bin.mkdir(parents=True)
        shutil.copyfile(source, usr_bin / "busybox")
        (usr_bin / "busybox").chmod(0o755)
        for applet in applets:
            (usr_bin / applet).symlink_to("busybox")
        (build / "bin").symlink_to("usr/bin")
        (build / "sbin").symlink_to("usr/bin")
        (build / "etc").mkdir()
        (build / "tmp").mkdir()
        build.chmod(0o755)
        version = subprocess.run(
            [str(source)], capture_output=True, text=True, check=False
        ).stdout.splitlines()[:1]
        (build / _MARKER).parent.mkdir(parents=True)
        (build / _MARKER).write_text((version[0] if version else "busybox") + "\n")
        try:
            os.rename(build, root)  # replaces dest if it is an empty folder
        except OSError:
            if is_complete_sysroot(root):  # built concurrently by someone else
                return root
            raise SysrootError(
                f"{root} exists and is not an empty folder nor a complete busybox sysroot"
            ) from None
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return root
