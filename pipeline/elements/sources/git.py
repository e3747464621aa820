"""``git``: a commit of a git repository, with its submodules (buildstream-plugins' ``git``).

- A repository over the network (``http(s)://``, ``git://``, ``ssh://``,
  ``user@host:path``, ``file://``), directly or through a project alias, is
  fetched by a worker (:meth:`GitSource.fetch`) into a bare mirror kept under
  the worker's fetch cache (:mod:`.git_mirror`), trying the alias's mirrors
  and the URL in order, then staged from there.
- A repository given as a path on the submitting host (relative to the
  project, or absolute) is checked when the project loads and staged by the
  submitter, as local sources are.

Both stage the commit's tree with ``git ls-tree`` / ``git cat-file`` and then,
recursively, each submodule the commit's ``.gitmodules`` lists at its gitlink
commit, fetched from its own mirror: ``checkout-submodules`` (default true)
and ``submodules: PATH: {checkout, url}`` decide which, as in
buildstream-plugins; a relative submodule URL is resolved against its
superproject's URL; an ``alias:`` URL goes through the project's aliases.

The source cache key follows buildstream-plugins' unique key: the URL as
written, the commit (a ``TAG-N-gCOMMIT`` ref keys as its commit), and the
submodule settings that differ from the defaults.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.errors import SourceError
from pipeline.elements.nodes import MappingNode, Mark, ScalarNode
from pipeline.elements.sources.base import (
    FetchContext,
    FetchRequest,
    NetworkSettings,
    Source,
    SourceContext,
    source_cache_key,
)
from pipeline.elements.sources.git_mirror import (
    GitRemoteError,
    fetch_all,
    fetch_commit,
    network_git,
    redact,
    resolve_relative_url,
)
from pipeline.elements.sources.git_plumbing import (
    GitError,
    git,
    git_path,
    read_git_blobs,
    stderr_of,
)
from pipeline.elements.sources.helpers import (
    COMMON_KEYS,
    optional_ref,
    resolve_alias,
    source_directory,
)
from pipeline.elements.staging import TreeBuilder, UnsafeArchiveError

__all__ = ["GitSource", "is_network_git_url"]

# A full commit id (SHA-1 or SHA-256 repositories), alone or at the end of
# BuildStream git's `git describe` form: `v1.2-3-g<commit>`.
_GIT_REF_RE = re.compile(r"(?:.*-g)?([0-9a-f]{40}|[0-9a-f]{64})")
# buildstream-plugins git keys that only feed its SourceInfo reports.
_REPORT_ONLY_KEYS = ("version", "version-guess-pattern")
_KEYS = (
    "url", "ref", "track", "submodules", "checkout-submodules", "ref-format", "track-tags", "tags"
)  # fmt: skip
_NETWORK_SCHEMES = frozenset({"http", "https", "git", "ssh", "git+ssh", "ssh+git", "file"})
# git's own rule for `host:path` (scp-like ssh): a colon before any slash.
_SCP_RE = re.compile(r"^(?:[^@/:]+@)?[^/:]+:(?!//)")
_REF_FORMATS = ("sha1", "git-describe")


def is_network_git_url(url: str) -> bool:
    """Whether git fetches ``url`` (alias resolved) rather than reading a local path."""
    if "://" in url:
        return True
    return bool(_SCP_RE.match(url)) and not url.startswith(("/", "./", "../"))


@dataclass(frozen=True)
class _Submodule:
    """``submodules: PATH:`` of a source."""

    url: str | None
    """The URL as written (None: the one in ``.gitmodules``)."""
    urls: list[str] | None
    """Its candidates, in order."""
    upstream: str | None
    """Its alias resolved (names its mirror)."""
    checkout: bool | None
    """None: ``checkout-submodules`` decides."""


class GitSource(Source):
    """A commit of a git repository (``url``: a network URL or a local path), with submodules."""

    kind: ClassVar[str] = "git"
    plugin_packages: ClassVar[frozenset[str]] = frozenset({"buildstream-plugins"})

    def __init__(
        self,
        *,
        url: str,
        upstream: str,
        urls: list[str],
        repo: Path | None,
        ref: str | None,
        commit: str | None,
        track: str | None,
        ref_format: str,
        track_tags: bool,
        tags: list[tuple[str, str, bool]],
        checkout_submodules: bool,
        submodules: dict[str, _Submodule],
        aliases: dict[str, list[str]],
        directory: str,
        mark: Mark,
        field: str,
    ) -> None:
        super().__init__(directory=directory, mark=mark, field=field)
        self.url = url
        self.upstream = upstream
        self.urls = urls
        self.repo = repo
        self.ref = ref
        self.commit = commit
        self.track_name = track
        self.ref_format = ref_format
        self.track_tags = track_tags
        self.tags = tags
        self._tracked_tags: list[tuple[str, str, bool]] | None = None
        self.checkout_submodules = checkout_submodules
        self.submodules = submodules
        self.aliases = aliases

    @classmethod
    def load(cls, node: MappingNode, ctx: SourceContext) -> GitSource:
        """A network ``url`` is taken as written; a local one must hold the commit."""
        directory = source_directory(node)
        node.validate_keys((*_KEYS, *_REPORT_ONLY_KEYS, *COMMON_KEYS))
        for key in _REPORT_ONLY_KEYS:
            node.get_scalar(key)  # a string if given
        tags = _tags(node, ctx)
        url_node = node.require_str("url")
        url = ctx.variables.expand_node(url_node)
        upstream = resolve_alias(url, ctx.aliases)
        network = is_network_git_url(upstream)
        if network:
            scheme = urllib.parse.urlsplit(upstream).scheme if "://" in upstream else "ssh"
            if scheme not in _NETWORK_SCHEMES:
                raise url_node.error(f"git URL scheme {scheme!r} is not supported ({url!r})")
        track_node = node.get_scalar("track")
        track = None
        if track_node is not None and track_node.value is not None:
            track = ctx.variables.expand_node(track_node)
        ref_node = optional_ref(node, tracking=track is not None)
        ref = commit = None
        if ref_node is not None:
            ref = ctx.variables.expand_node(ref_node)
            match = _GIT_REF_RE.fullmatch(ref)
            if match is None:
                raise ref_node.error(
                    f"expected a full commit id (40 or 64 hex digits), got {ref!r}"
                )
            commit = match.group(1)
        format_node = node.get_scalar("ref-format")
        ref_format = "sha1"
        if format_node is not None and format_node.value is not None:
            ref_format = format_node.as_str()
            if ref_format not in _REF_FORMATS:
                raise format_node.error(
                    f"ref-format must be one of {', '.join(_REF_FORMATS)}, got {ref_format!r}"
                )
        if network and commit is not None and upstream.startswith("file://"):
            # A repository on this host too: a missing commit is refused now,
            # not on a worker later (one on the workers' hosts only is not checked).
            _check_file_url_commit(upstream, commit, ref_node)
        repo = None
        if not network:
            repo = _local_repo(upstream, url_node, ctx.project_dir)
            # Absolute: relative submodule URLs and tracking resolve against it.
            upstream = str(repo.resolve())
            if commit is not None:
                exists = git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
                if exists.returncode != 0:
                    assert ref_node is not None
                    raise ref_node.error(f"commit {commit} not found in git repository {repo}")
        return cls(
            url=url,
            upstream=upstream,
            urls=ctx.url_candidates(url) if network else [upstream],
            repo=repo,
            ref=ref,
            commit=commit,
            track=track,
            ref_format=ref_format,
            track_tags=_bool(node, "track-tags", False),
            tags=tags,
            checkout_submodules=_bool(node, "checkout-submodules", True),
            submodules=_submodules(node, ctx),
            aliases={name: ctx.url_candidates(f"{name}:") for name in ctx.aliases},
            directory=directory,
            mark=node.mark,
            field=node.path,
        )

    # --- keys -------------------------------------------------------------------

    def unique_key(self) -> list[Any]:
        """buildstream-plugins git's unique key: URL as written, commit, and the
        submodule settings that are not the defaults."""
        key: list[Any] = [self.url, self.commit]
        if self.tags:
            key.append({"tags": {tag: [commit, annotated] for tag, commit, annotated in self.tags}})
        if not self.checkout_submodules:
            key.append({"checkout_submodules": False})
        overrides = {path: sub.url for path, sub in self.submodules.items()}
        if overrides:
            key.append(overrides)
        checkouts = {p: s.checkout for p, s in self.submodules.items() if s.checkout is not None}
        if checkouts:
            key.append({"submodule_checkout_overrides": checkouts})
        return key

    def content_key(self) -> str:
        key = self.unique_key()
        if len(key) == 2:
            return self.commit or ""  # a plain commit keys as it always did
        return json.dumps(key[1:], sort_keys=True, separators=(",", ":"))

    # --- fetching and staging ------------------------------------------------------

    def fetch_request(self, element: str, index: int, file: str) -> FetchRequest | None:
        """What a worker fetches (a network repository); a local one is staged
        by the submitter (None)."""
        if self.repo is not None or self.commit is None:
            return None
        return {
            "kind": self.kind,
            "key": source_cache_key(self.kind, self.unique_key()),
            "element": element,
            "index": index,
            "field": self.field,
            "file": file,
            "urls": list(self.urls),
            "config": self._config(),
        }

    @classmethod
    def fetch(cls, request: FetchRequest, ctx: FetchContext) -> Digest:
        """Fetch the commit (and its submodules) into mirrors, stage its tree.

        Raises:
            SourceError: no candidate URL gave a commit, or the tree is refused;
                names the element, the source and the URLs tried.
        """
        config = request["config"]
        where = f"{request['element'] or request['file']}: {request['field']}"
        try:
            return _stage(None, request["urls"], config, ctx)
        except _StageError as exc:
            error = SourceError(f"{where}: {exc}", file=request["file"] or None)
            error.transient = exc.transient
            raise error from None

    def stage(self, cas: LocalCas, workdir: Path, network: NetworkSettings | None = None) -> Digest:
        """Stage the commit: a local repository directly, a network one through
        :meth:`fetch` with a scratch cache."""
        if self.commit is None:
            raise self._error("no ref: run 'remex source track' or write the ref")
        ctx = FetchContext(
            cas=cas,
            workdir=workdir / "fetch",
            cache_dir=workdir / "cache",
            network=network or NetworkSettings(),
        )
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        try:
            return _stage(self.repo, self.urls, self._config(), ctx)
        except _StageError as exc:
            raise self._error(str(exc)) from None

    def track(self, ctx: FetchContext) -> str | None:
        """The commit ``track`` (a branch or tag) names now, as ``ref-format`` says.

        Raises:
            SourceError: no URL could be fetched, or ``track`` names nothing there.
        """
        if self.track_name is None:
            return None
        try:
            mirror = fetch_all(ctx.cache_dir, self.upstream, self.urls, ctx.network)
        except GitRemoteError as exc:
            raise self._error(f"cannot fetch to track {self.track_name!r}: {exc}") from None
        found = network_git(mirror, ["rev-list", "-n", "1", self.track_name, "--"], ctx.network)
        commit = found.stdout.decode().strip()
        if found.returncode != 0 or not commit:
            raise self._error(
                f"track {self.track_name!r} names no commit in {redact(self.urls[0])}: "
                f"{stderr_of(found)}"
            )
        self._tracked_tags = _reachable_tags(mirror, commit, ctx) if self.track_tags else None
        if self.ref_format == "sha1":
            return commit
        described = network_git(
            mirror, ["describe", "--tags", "--abbrev=40", "--long", "--always", commit],
            ctx.network,
        )  # fmt: skip
        if described.returncode != 0:
            raise self._error(f"git describe {commit} failed: {stderr_of(described)}")
        return described.stdout.decode().strip()

    def tracked_keys(self) -> dict[str, Any]:
        """With ``track-tags``: the ``tags`` the last :meth:`track` found (as bst writes them)."""
        if self._tracked_tags is None:
            return {}
        return {
            "tags": [
                {"tag": tag, "commit": commit, "annotated": annotated}
                for tag, commit, annotated in self._tracked_tags
            ]
        }

    def _config(self) -> dict[str, Any]:
        return {
            "tags": [list(tag) for tag in self.tags],
            "url": self.url,
            "upstream": self.upstream,
            "commit": self.commit,
            "checkout_submodules": self.checkout_submodules,
            "submodules": {
                path: {"url": s.url, "urls": s.urls, "upstream": s.upstream, "checkout": s.checkout}
                for path, s in self.submodules.items()
            },
            "aliases": self.aliases,
        }


# --- staging (shared by the worker's fetch and the submitter's local staging) ----------


class _StageError(Exception):
    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class _Repo:
    prefix: list[str]
    """Where in the staged tree it goes (the superproject: [])."""
    upstream: str
    urls: list[str]
    commit: str


def _stage(
    local: Path | None, urls: list[str], config: dict[str, Any], ctx: FetchContext
) -> Digest:
    """The commit's tree with its submodules, in ``ctx.cas``."""
    builder = TreeBuilder(ctx.cas)
    queue = deque([_Repo([], config["upstream"], list(urls), config["commit"])])
    first = True
    while queue:
        repo = queue.popleft()
        where = local if first and local is not None else _mirror(repo, ctx)
        first = False
        gitlinks = _add_tree(builder, where, repo)
        if not repo.prefix and config.get("tags"):
            _add_git_dir(builder, where, repo.commit, config["tags"], ctx.workdir)
        for path, url in _gitmodules(where, repo.commit):
            full = "/".join([*repo.prefix, path])
            setting = config["submodules"].get(full) or {}
            checkout = setting.get("checkout")
            if not (config["checkout_submodules"] if checkout is None else checkout):
                continue
            # Only a path the tree has a gitlink at (so a checked, safe path):
            # one only in .gitmodules was never added; bst warns and skips it.
            commit = gitlinks.get(path.strip("/"))
            if commit is None:
                continue
            written = setting.get("url")
            if written and not written.startswith(("./", "../")):
                upstream, candidates = setting["upstream"], list(setting["urls"])
            else:
                upstream, candidates = _submodule_urls(written or url, repo, config["aliases"])
            parts = path.strip("/").split("/")
            queue.append(_Repo([*repo.prefix, *parts], upstream, candidates, commit))
    try:
        return builder.finish()
    except UnsafeArchiveError as exc:
        raise _StageError(f"git commit {config['commit']} of {config['url']}: {exc}") from None


def _mirror(repo: _Repo, ctx: FetchContext) -> Path:
    try:
        return fetch_commit(
            ctx.cache_dir, repo.upstream, repo.urls, repo.commit, ctx.network,
            lambda received: ctx.progress(received, None),
        )  # fmt: skip
    except GitRemoteError as exc:
        what = "repository" if not repo.prefix else f"submodule {'/'.join(repo.prefix)}"
        # A commit that no URL has is for people to fix; a URL that did not
        # answer may answer later.
        raise _StageError(
            f"cannot fetch commit {repo.commit} of {what} (tried {len(repo.urls)} URL(s)): {exc}",
            transient=not exc.missing,
        ) from None


def _add_tree(builder: TreeBuilder, where: Path, repo: _Repo) -> dict[str, str]:
    """Add the commit's files under ``repo.prefix``; return its gitlinks (path -> commit).

    Not ``git archive``: it applies the repository's ``export-ignore`` and
    ``export-subst`` attributes, so its output is not the commit's content.
    """
    listing = git(where, "ls-tree", "-r", "-z", "--full-tree", repo.commit)
    if listing.returncode != 0:
        raise _StageError(f"git ls-tree {repo.commit} failed: {stderr_of(listing)}")
    entries: list[tuple[str, str, str, list[str]]] = []
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
            entries.append((raw_mode.decode(), raw_oid.decode(), path, git_path(path)))
        blob_ids = [oid for mode, oid, _, _ in entries if mode != "160000"]
        blobs = read_git_blobs(where, blob_ids, builder.cas)
        gitlinks: dict[str, str] = {}
        for mode, oid, path, parts in entries:
            full = [*repo.prefix, *parts]
            if mode == "160000":
                builder.add_folder(full)  # empty unless the submodule is checked out
                gitlinks[path] = oid
            elif mode == "120000":
                builder.add_symlink(full, _symlink_target(full, blobs[oid][1]))
            elif mode in ("100644", "100755"):
                builder.add_file(full, blobs[oid][0], mode == "100755")
            else:
                raise UnsafeArchiveError(f"entry {'/'.join(full)!r} has git mode {mode}")
        return gitlinks
    except UnsafeArchiveError as exc:
        raise _StageError(f"git commit {repo.commit}: {exc}") from None
    except GitError as exc:
        raise _StageError(f"git cat-file in {where} failed: {exc}") from None


def _add_git_dir(
    builder: TreeBuilder, where: Path, commit: str, tags: list[list[Any]], scratch: Path
) -> None:
    """Stage a ``.git`` holding the tags and the commits between them and ``commit``
    (commit objects only, shallow at the boundaries), so ``git describe`` works
    in the build: buildstream-plugins' ``tags``."""
    included: set[str] = set()
    shallow: set[str] = set()
    for _, tagged, _ in tags:
        if tagged == commit:
            shallow.add(commit)
            continue
        history = git(where, "rev-list", "--ancestry-path", "--boundary", f"{tagged}..{commit}")
        if history.returncode != 0:
            raise _StageError(f"git rev-list {tagged}..{commit} failed: {stderr_of(history)}")
        for line in history.stdout.decode().split():
            (shallow if line.startswith("-") else included).add(line.lstrip("-"))
    shallow -= included
    included |= shallow
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        repo = Path(work) / "repo"
        _checked(git(Path(work), "init", "--quiet", "--template=", str(repo)), "git init")
        for rev in sorted(included):
            body = git(where, "cat-file", "commit", rev)
            _checked(body, f"git cat-file commit {rev}")
            _checked(git(repo, "hash-object", "-w", "-t", "commit", "--stdin", stdin=body.stdout),
                     f"git hash-object {rev}")  # fmt: skip
        dot_git = repo / ".git"
        (dot_git / "shallow").write_text("".join(f"{rev}\n" for rev in sorted(shallow)))
        for tag, tagged, annotated in tags:
            target = tagged
            if annotated:
                data = (f"object {tagged}\ntype commit\ntag {tag}\n"
                        "tagger Unspecified Tagger <unspecified-tagger> 0 +0000\n")  # fmt: skip
                made = git(repo, "hash-object", "-w", "-t", "tag", "--stdin", stdin=data.encode())
                _checked(made, f"git hash-object (tag {tag})")
                target = made.stdout.decode().strip()
            _checked(git(repo, "tag", tag, target), f"git tag {tag}")
        (dot_git / "HEAD").write_text(f"{commit}\n")
        try:
            for path in sorted(dot_git.rglob("*")):
                parts = [".git", *path.relative_to(dot_git).parts]
                if path.is_symlink():
                    continue
                if path.is_dir():
                    builder.add_folder(parts)
                else:
                    builder.add_file(parts, builder.cas.put_file(path), False)
        except UnsafeArchiveError as exc:
            raise _StageError(f"staging .git with tags: {exc}") from None


def _checked(result: subprocess.CompletedProcess[bytes], what: str) -> None:
    if result.returncode != 0:
        raise _StageError(f"{what} failed: {stderr_of(result)}")


def _reachable_tags(mirror: Path, commit: str, ctx: FetchContext) -> list[tuple[str, str, bool]]:
    """The tags ``git describe`` finds from ``commit`` (first parent or not, annotated
    or not), as buildstream-plugins' ``track-tags`` collects them; sorted by name."""
    found: set[tuple[str, str, bool]] = set()
    for options in ([], ["--first-parent"], ["--tags"], ["--tags", "--first-parent"]):
        described = network_git(mirror, ["describe", "--abbrev=0", commit, *options], ctx.network)
        if described.returncode != 0:
            continue
        tag = described.stdout.decode().strip()
        tagged = network_git(mirror, ["rev-parse", f"{tag}^{{commit}}"], ctx.network)
        if tagged.returncode != 0:
            raise GitRemoteError(f"cannot resolve tag {tag!r}: {stderr_of(tagged)}")
        annotated = network_git(mirror, ["cat-file", "tag", tag], ctx.network).returncode == 0
        found.add((tag, tagged.stdout.decode().strip(), annotated))
    return sorted(found)


def _gitmodules(where: Path, commit: str) -> list[tuple[str, str]]:
    """(path, url) of each submodule the commit's ``.gitmodules`` lists."""
    probe = git(where, "cat-file", "-e", f"{commit}:.gitmodules")
    if probe.returncode != 0:
        return []
    result = git(where, "config", "-z", "--blob", f"{commit}:.gitmodules", "--list")
    if result.returncode != 0:
        raise _StageError(f"cannot read .gitmodules of commit {commit}: {stderr_of(result)}")
    sections: dict[str, dict[str, str]] = {}
    for record in result.stdout.decode("utf-8", "replace").split("\0"):
        key, _, value = record.partition("\n")
        name, _, option = key.rpartition(".")
        if not name.startswith("submodule."):
            continue
        sections.setdefault(name[len("submodule.") :], {})[option] = value
    return [
        (entry["path"], entry["url"])
        for entry in sections.values()
        if "path" in entry and "url" in entry
    ]


def _submodule_urls(
    url: str, parent: _Repo, aliases: dict[str, list[str]]
) -> tuple[str, list[str]]:
    """The mirror name and candidates of a ``.gitmodules`` URL."""
    alias, sep, rest = url.partition(":")
    if sep and alias in aliases and not rest.startswith("//"):
        candidates = [prefix + rest for prefix in aliases[alias]]
        return candidates[-1], candidates
    if url.startswith(("./", "../")):
        candidates = [resolve_relative_url(base, url) for base in parent.urls]
        return resolve_relative_url(parent.upstream, url), list(dict.fromkeys(candidates))
    return url, [url]


def _symlink_target(parts: list[str], target: bytes | None) -> str:
    if target is None:
        raise UnsafeArchiveError(f"symlink {'/'.join(parts)!r}: target too long")
    try:
        return target.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(
            f"symlink {'/'.join(parts)!r}: target is not valid UTF-8"
        ) from None


# --- loading -------------------------------------------------------------------------


def _local_repo(url: str, node: ScalarNode, project_dir: Path) -> Path:
    path = Path(url)
    repo = path if path.is_absolute() else project_dir / path
    if not repo.is_dir():
        raise node.error(f"git repository not found: {repo}")
    probe = git(repo, "rev-parse", "--git-dir")
    if probe.returncode != 0:
        raise node.error(f"not a git repository: {repo} ({stderr_of(probe)})")
    return repo


def _check_file_url_commit(url: str, commit: str, ref_node: ScalarNode | None) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return
    path = Path(urllib.parse.unquote(parts.path))
    if not path.is_dir() or git(path, "rev-parse", "--git-dir").returncode != 0:
        return
    if git(path, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        assert ref_node is not None
        raise ref_node.error(f"commit {commit} not found in git repository {url}")


def _bool(node: MappingNode, key: str, default: bool) -> bool:
    scalar = node.get_scalar(key)
    if scalar is None or scalar.value is None:
        return default
    value = scalar.as_str()
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    raise scalar.error(f"expected a boolean (true or false), got {value!r}")


def _tags(node: MappingNode, ctx: SourceContext) -> list[tuple[str, str, bool]]:
    sequence = node.get_sequence("tags")
    if sequence is None:
        return []
    tags = []
    for item in sequence.items:
        if not isinstance(item, MappingNode):
            raise item.error(f"expected a mapping (tag, commit, annotated), got {item.describe()}")
        item.validate_keys(("tag", "commit", "annotated"))
        tag = ctx.variables.expand_node(item.require_str("tag"))
        commit_node = item.require_str("commit")
        commit = ctx.variables.expand_node(commit_node)
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
            raise commit_node.error(f"expected a full commit id, got {commit!r}")
        if item.get_scalar("annotated") is None:
            raise item.error("missing required key 'annotated'", field=item.child_path("annotated"))
        tags.append((tag, commit, _bool(item, "annotated", False)))
    return tags


def _submodules(node: MappingNode, ctx: SourceContext) -> dict[str, _Submodule]:
    mapping = node.get_mapping("submodules")
    if mapping is None:
        return {}
    result: dict[str, _Submodule] = {}
    for path in mapping:
        entry = mapping.get_mapping(path)
        if entry is None:
            raise mapping.key_error(path, "expected a mapping with 'url' and/or 'checkout'")
        entry.validate_keys(("url", "checkout"))
        url_node = entry.get_scalar("url")
        url = urls = upstream = None
        if url_node is not None and url_node.value is not None:
            url = ctx.variables.expand_node(url_node)
            upstream = resolve_alias(url, ctx.aliases)
            urls = ctx.url_candidates(url)
        checkout = None
        if "checkout" in entry:
            checkout = _bool(entry, "checkout", True)
        result[path.strip("/")] = _Submodule(url, urls, upstream, checkout)
    return result
