"""BuildStream's default split rules (project.conf ``split-rules`` goes over them)."""

from __future__ import annotations

__all__ = ["DEFAULT_SPLIT_RULES"]

DEFAULT_SPLIT_RULES: dict[str, list[str]] = {
    "runtime": [
        "%{bindir}",
        "%{bindir}/*",
        "%{sbindir}",
        "%{sbindir}/*",
        "%{libexecdir}",
        "%{libexecdir}/*",
        "%{libdir}/lib*.so*",
    ],
    "devel": [
        "%{includedir}",
        "%{includedir}/**",
        "%{libdir}/lib*.a",
        "%{libdir}/lib*.la",
        "%{libdir}/pkgconfig/*.pc",
        "%{datadir}/pkgconfig/*.pc",
        "%{datadir}/aclocal/*.m4",
    ],
    "debug": ["%{debugdir}", "%{debugdir}/**"],
    "doc": [
        "%{docdir}",
        "%{docdir}/**",
        "%{infodir}",
        "%{infodir}/**",
        "%{mandir}",
        "%{mandir}/**",
    ],
    "locale": [
        "%{datadir}/locale",
        "%{datadir}/locale/**",
        "%{datadir}/i18n",
        "%{datadir}/i18n/**",
        "%{datadir}/zoneinfo",
        "%{datadir}/zoneinfo/**",
    ],
}
"""Domain -> globs, before variable expansion (BuildStream's project defaults)."""
