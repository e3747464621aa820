"""BuildStream 2's project defaults that remex follows: variables, environment, ISAs.

These are facts of the format (BuildStream's ``projectconfig.yaml``, the
element plugins' defaults and its platform naming), so that an element means
the same under remex as under ``bst``.
"""

from __future__ import annotations

import platform

from pipeline.elements.errors import LoadError

__all__ = [
    "DEFAULT_ENVIRONMENT",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_VARIABLES",
    "PROTECTED_VARIABLES",
    "canonical_arch",
    "host_arch",
    "host_os",
]

DEFAULT_VARIABLES: dict[str, str] = {
    "prefix": "/usr",
    "exec_prefix": "%{prefix}",
    "bindir": "%{exec_prefix}/bin",
    "sbindir": "%{exec_prefix}/sbin",
    "libexecdir": "%{exec_prefix}/libexec",
    "datadir": "%{prefix}/share",
    "sysconfdir": "/etc",
    "sharedstatedir": "%{prefix}/com",
    "localstatedir": "/var",
    "lib": "lib",
    "libdir": "%{prefix}/%{lib}",
    "debugdir": "%{libdir}/debug",
    "includedir": "%{prefix}/include",
    "docdir": "%{datadir}/doc",
    "infodir": "%{datadir}/info",
    "mandir": "%{datadir}/man",
    "build-root": "/buildstream/%{project-name}/%{element-name}",
    "conf-root": ".",
    "install-root": "/buildstream-install",
    "strip-binaries": "",
}
"""BuildStream's project defaults, before project.conf ``variables``."""

PROTECTED_VARIABLES = ("project-name", "element-name", "max-jobs")
"""Set by the loader; BuildStream refuses a redefinition, and so does remex."""

DEFAULT_MAX_JOBS = 8
"""``%{max-jobs}``. BuildStream uses the loading host's CPU count capped at 8;
remex builds on other machines and wants cache keys that do not depend on
the host that loaded the project, so it uses the cap itself (``notparallel``
still makes it 1)."""

DEFAULT_ENVIRONMENT: dict[str, str] = {
    "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
    "SHELL": "/bin/sh",
    "TERM": "dumb",
    "USER": "tomjon",
    "USERNAME": "tomjon",
    "LOGNAME": "tomjon",
    "LC_ALL": "C",
    "HOME": "/tmp",
    "TZ": "UTC",
    # 2011-11-11 11:11:11 UTC, BuildStream's constant for reproducible builds.
    "SOURCE_DATE_EPOCH": "1321009871",
}
"""BuildStream's build environment, before project.conf ``environment``."""

# BuildStream's canonical architecture names (Platform.canonicalize_arch).
_ARCH_ALIASES = {
    "aarch32": "aarch32",
    "aarch64": "aarch64",
    "aarch64-be": "aarch64-be",
    "amd64": "x86-64",
    "arm": "aarch32",
    "armv8l": "aarch64",
    "armv8b": "aarch64-be",
    "i386": "x86-32",
    "i486": "x86-32",
    "i586": "x86-32",
    "i686": "x86-32",
    "la64v100": "la64v100",
    "loong64": "la64v100",
    "loongarch64": "la64v100",
    "power-isa-be": "power-isa-be",
    "power-isa-le": "power-isa-le",
    "powerpc": "power-isa-be",
    "powerpc64": "power-isa-be",
    "powerpc64le": "power-isa-le",
    "ppc64": "power-isa-be",
    "ppc64le": "power-isa-le",
    "riscv32": "rv32g",
    "riscv64": "rv64g",
    "rv32g": "rv32g",
    "rv64g": "rv64g",
    "sparc": "sparc-v9",
    "sparc64": "sparc-v9",
    "sparc-v9": "sparc-v9",
    "sun4v": "sparc-v9",
    "x86-32": "x86-32",
    "x86-64": "x86-64",
}


def canonical_arch(arch: str) -> str | None:
    """BuildStream's name for an architecture (``x86_64`` -> ``x86-64``), or None."""
    return _ARCH_ALIASES.get(arch.replace("_", "-").lower())


def host_os() -> str:
    """The default ``build-os``: the host's system name, lowercased (``linux``)."""
    return platform.system().lower()


def host_arch() -> str:
    """The default ``build-arch``: the host machine, canonicalized.

    Raises:
        LoadError: BuildStream does not know the host's architecture either.
    """
    machine = platform.machine()
    arch = canonical_arch(machine)
    if arch is None:
        raise LoadError(f"unknown host architecture {machine!r}; set sandbox.build-arch")
    return arch
