"""``git``: a commit of a local repository (a path or a ``file://`` URL, maybe via an alias).

Its keys are those of buildstream-plugins' ``git`` that remex reads (``url``,
``ref``, ``track``), so a project declaring that plugin's ``git`` gets this
kind. Submodules are not checked out (their keys are refused).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.nodes import MappingNode, Mark, ScalarNode
from pipeline.elements.sources.base import Source, SourceContext
from pipeline.elements.sources.git_plumbing import (
    GitError,
    git,
    git_path,
    read_git_blobs,
    stderr_of,
)
from pipeline.elements.sources.helpers import (
    COMMON_KEYS,
    file_url_path,
    require_ref,
    resolve_alias,
    source_directory,
)
from pipeline.elements.staging import TreeBuilder, UnsafeArchiveError

__all__ = ["GitSource"]

# A full commit id (SHA-1 or SHA-256 repositories), alone or at the end of
# BuildStream git's `git describe` form: `v1.2-3-g<commit>`.
_GIT_REF_RE = re.compile(r"(?:.*-g)?([0-9a-f]{40}|[0-9a-f]{64})")
# buildstream-plugins git keys that only feed its SourceInfo reports.
_REPORT_ONLY_KEYS = ("version", "version-guess-pattern")
# buildstream-plugins git keys that would change what is staged.
_UNSUPPORTED_KEYS = ("submodules", "checkout-submodules", "track-tags", "tags", "ref-format")


class GitSource(Source):
    """A commit of a local git repository (``url``: a path or ``file://``)."""

    kind: ClassVar[str] = "git"
    plugin_packages: ClassVar[frozenset[str]] = frozenset({"buildstream-plugins"})

    def __init__(
        self, *, url: str, repo: Path, commit: str, directory: str, mark: Mark, field: str
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url = url
        self.repo = repo
        self.commit = commit

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> GitSource:
        """``url`` must be a local repository holding the commit ``ref`` names."""
        directory = source_directory(node)
        node.validate_keys(
            ("url", "ref", "track", *_REPORT_ONLY_KEYS, *COMMON_KEYS),
            unsupported=_UNSUPPORTED_KEYS,
        )
        for key in _REPORT_ONLY_KEYS:
            node.get_scalar(key)  # a string if given
        url_node = node.require_str("url")
        url = resolve_alias(ctx.variables.expand_node(url_node), ctx.aliases)
        repo = _repo_path(url, url_node, ctx.project_dir)
        ref_node = require_ref(node)
        ref = ctx.variables.expand_node(ref_node)
        match = _GIT_REF_RE.fullmatch(ref)
        if match is None:
            raise ref_node.error(f"expected a full commit id (40 or 64 hex digits), got {ref!r}")
        commit = match.group(1)
        if not repo.is_dir():
            raise url_node.error(f"git repository not found: {repo}")
        probe = git(repo, "rev-parse", "--git-dir")
        if probe.returncode != 0:
            raise url_node.error(f"not a git repository: {repo} ({stderr_of(probe)})")
        exists = git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
        if exists.returncode != 0:
            raise ref_node.error(f"commit {commit} not found in git repository {repo}")
        return cls(
            url=url, repo=repo, commit=commit, directory=directory, mark=node.mark, field=node.path
        )

    def content_key(self) -> str:
        return self.commit

    def stage(self, cas: LocalCas, workdir: Path) -> Digest:
        """Store the commit's tree, read with ``git ls-tree`` and ``git cat-file``.

        Not ``git archive``: it applies the repository's ``export-ignore`` and
        ``export-subst`` attributes, so its output is not the commit's content.
        Submodules become empty folders (they are not fetched).
        """
        listing = git(self.repo, "ls-tree", "-r", "-z", "--full-tree", self.commit)
        if listing.returncode != 0:
            raise self._error(f"git ls-tree {self.commit} failed: {stderr_of(listing)}")
        entries: list[tuple[str, str, list[str]]] = []
        try:
            for record in listing.stdout.split(b"\0"):
                if not record:
                    continue
                meta, _, raw_path = record.partition(b"\t")
                raw_mode, _, rest = meta.partition(b" ")
                _, _, raw_oid = rest.partition(b" ")
                try:
                    path = raw_path.decode("utf-8")
                except UnicodeDecodeError:
                    raise UnsafeArchiveError(f"path {raw_path!r} is not valid UTF-8") from None
                entries.append((raw_mode.decode(), raw_oid.decode(), git_path(path)))
            builder = TreeBuilder(cas)
            blob_ids = [oid for mode, oid, _ in entries if mode != "160000"]
            blobs = read_git_blobs(self.repo, blob_ids, cas)
            for mode, oid, parts in entries:
                if mode == "160000":
                    builder.add_folder(parts)
                elif mode == "120000":
                    builder.add_symlink(parts, _symlink_target(parts, blobs[oid][1]))
                elif mode in ("100644", "100755"):
                    builder.add_file(parts, blobs[oid][0], mode == "100755")
                else:
                    raise UnsafeArchiveError(f"entry {'/'.join(parts)!r} has git mode {mode}")
            return builder.finish()
        except UnsafeArchiveError as exc:
            raise self._error(f"git commit {self.commit} of {self.url}: {exc}") from None
        except GitError as exc:
            raise self._error(f"git cat-file in {self.repo} failed: {exc}") from None


def _symlink_target(parts: list[str], target: bytes | None) -> str:
    if target is None:
        raise UnsafeArchiveError(f"symlink {'/'.join(parts)!r}: target too long")
    try:
        return target.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(
            f"symlink {'/'.join(parts)!r}: target is not valid UTF-8"
        ) from None


def _repo_path(url: str, node: ScalarNode, project_dir: Path) -> Path:
    if "://" in url:
        return file_url_path(url, node, "only local git repositories (a path or a file:// URL, "
                             "directly or through a project alias) are supported")  # fmt: skip
    path = Path(url)
    return path if path.is_absolute() else project_dir / path
