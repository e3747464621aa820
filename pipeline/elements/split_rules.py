"""Split domains: BuildStream's default ``split-rules`` and how files are selected by them.

A split domain (``runtime``, ``devel``, ...) is a list of globs over artifact
paths; compose and filter elements pick files by domain. The rules below are
BuildStream 2's (``Element.compute_manifest`` and the split filter it uses when
staging), learnt from its ``element.py``:

- A rule is matched against ``"/" + path`` with BuildStream's glob (``*`` and
  ``?`` stop at ``/``, ``**`` crosses it); a rule is used as written after
  variable expansion, so a rule without a leading ``/`` matches nothing.
- No include, no exclude and orphans wanted: every path, unfiltered.
- Otherwise an empty include means every domain of the element; domains in
  include or exclude that the element does not define are ignored.
- A path is selected when a domain it matches is included, or it matches no
  domain at all (an orphan) and orphans are wanted; and it matches no
  excluded domain. Exclusion wins.
- Folders, files and symlinks alike are judged by their own path (a symlink is
  not followed). When staging, a folder that is not selected itself still
  appears when something under it is selected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

from pipeline.elements.staging import glob_to_regex

__all__ = [
    "DEFAULT_SPLIT_RULES",
    "bst_path_order",
    "compile_domains",
    "domains_of_paths",
    "path_filter",
    "select_paths",
    "staged_paths",
]

#: BuildStream's project-wide split rules (its ``projectconfig.yaml``), before
#: variable expansion. Elements extend them through ``public: bst: split-rules``.
DEFAULT_SPLIT_RULES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # Programs and shared libraries: what is needed to run.
        "runtime": (
            "%{bindir}",
            "%{bindir}/*",
            "%{sbindir}",
            "%{sbindir}/*",
            "%{libexecdir}",
            "%{libexecdir}/*",
            "%{libdir}/lib*.so*",
        ),
        # Headers, static and libtool archives, pkg-config and aclocal files.
        "devel": (
            "%{includedir}",
            "%{includedir}/**",
            "%{libdir}/lib*.a",
            "%{libdir}/lib*.la",
            "%{libdir}/pkgconfig/*.pc",
            "%{datadir}/pkgconfig/*.pc",
            "%{datadir}/aclocal/*.m4",
        ),
        "debug": ("%{debugdir}", "%{debugdir}/**"),
        "doc": (
            "%{docdir}",
            "%{docdir}/**",
            "%{infodir}",
            "%{infodir}/**",
            "%{mandir}",
            "%{mandir}/**",
        ),
        "locale": (
            "%{datadir}/locale",
            "%{datadir}/locale/**",
            "%{datadir}/i18n",
            "%{datadir}/i18n/**",
            "%{datadir}/zoneinfo",
            "%{datadir}/zoneinfo/**",
        ),
    }
)


def compile_domains(domains: Mapping[str, Sequence[str]]) -> dict[str, re.Pattern[str]]:
    """One regular expression per domain, matching an absolute path (``/usr/bin/x``).

    Args:
        domains: domain name -> glob rules, variables already expanded.
    """
    compiled: dict[str, re.Pattern[str]] = {}
    for name, rules in domains.items():
        alternatives = "|".join(glob_to_regex(rule).pattern for rule in rules)
        # DOTALL as bst: "**" crosses even a newline in a file name. An empty
        # domain matches nothing (bst's "(?:)$" would match only "", never "/...").
        compiled[name] = re.compile(f"(?:{alternatives})" if rules else r"(?!)", re.DOTALL)
    return compiled


def domains_of_paths(
    domains: Mapping[str, Sequence[str]], paths: Iterable[str]
) -> dict[str, list[str]]:
    """Which of ``paths`` each domain claims (a path may be in several, or none).

    Args:
        domains: domain name -> glob rules, variables already expanded.
        paths: artifact paths relative to its root (``usr/bin/x``).

    Returns:
        domain name -> the claimed paths, in the order given; every domain is a key.
    """
    compiled = compile_domains(domains)
    claimed: dict[str, list[str]] = {name: [] for name in compiled}
    for path in paths:
        absolute = _absolute(path)
        for name, regex in compiled.items():
            if regex.match(absolute):
                claimed[name].append(path)
    return claimed


def path_filter(
    domains: Mapping[str, Sequence[str]],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    orphans: bool = True,
) -> Callable[[str], bool]:
    """bst's split filter as a predicate on a path (relative, ``usr/bin/sh``).

    Args:
        domains: the element's domains, variables already expanded.
        include: domains to take files from; empty means all of the element's.
        exclude: domains whose files are dropped (wins over include).
        orphans: whether paths in no domain are kept.
    """
    compiled = compile_domains(domains)
    included = {d for d in (include or list(compiled)) if d in compiled}
    excluded = {d for d in exclude if d in compiled}

    def keep(path: str) -> bool:
        absolute = _absolute(path)
        matched = {name for name, regex in compiled.items() if regex.match(absolute)}
        if matched & excluded:
            return False
        return bool(matched & included) or (orphans and not matched)

    return keep


def select_paths(
    domains: Mapping[str, Sequence[str]],
    paths: Iterable[str],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    orphans: bool = True,
) -> list[str]:
    """The paths bst's ``compute_manifest(include, exclude, orphans)`` keeps, in order
    (see :func:`path_filter`)."""
    paths = list(paths)
    if orphans and not include and not exclude:
        return paths
    keep = path_filter(domains, include=include, exclude=exclude, orphans=orphans)
    return [path for path in paths if keep(path)]


def staged_paths(
    domains: Mapping[str, Sequence[str]],
    files: Iterable[str],
    folders: Iterable[str],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    orphans: bool = True,
) -> set[str]:
    """What a split-filtered staging of an artifact into an empty folder creates.

    Files and symlinks are staged when selected; a folder when it is selected
    itself or when anything below it is staged (bst creates the folder while
    walking and removes it only when it stays empty and is not selected).

    Args:
        domains: the element's domains, variables already expanded.
        files: the artifact's file and symlink paths.
        folders: the artifact's folder paths (``usr``, ``usr/bin``).
        include: as :func:`select_paths`.
        exclude: as :func:`select_paths`.
        orphans: as :func:`select_paths`.

    Returns:
        The staged paths, files and folders together.
    """
    files = list(files)
    folders = list(folders)
    kept = set(
        select_paths(domains, files + folders, include=include, exclude=exclude, orphans=orphans)
    )
    for path in list(kept):
        parts = path.split("/")
        for end in range(1, len(parts)):
            kept.add("/".join(parts[:end]))
    return kept


def bst_path_order(files: Iterable[str], folders: Iterable[str]) -> list[str]:
    """Paths in the order bst lists an artifact (``list_relative_paths``).

    In each folder: its own path, then its files and symlinks by name, then its
    sub-folders by name, each listed the same way. The root is not listed.
    """
    children_files: dict[str, list[str]] = {}
    children_folders: dict[str, list[str]] = {}
    for folder in folders:
        children_folders.setdefault(_parent(folder), []).append(folder)
    for file in files:
        children_files.setdefault(_parent(file), []).append(file)
    order: list[str] = []
    stack = [""]
    while stack:
        folder = stack.pop()
        if folder:
            order.append(folder)
        order.extend(sorted(children_files.get(folder, []), key=_name))
        stack.extend(sorted(children_folders.get(folder, []), key=_name, reverse=True))
    return order


def _absolute(path: str) -> str:
    return "/" + path.lstrip("/")


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _name(path: str) -> str:
    return path.rpartition("/")[2]
