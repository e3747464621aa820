"""An index of pushed artifacts in Redis, so that artifacts can be listed by key.

Remote Asset v1 resolves names but cannot enumerate them, so ``remex artifact
list --key PREFIX`` (and artifact refs with wildcards) need a list of what was
pushed. Each worker adds an entry when its ``push_artifact`` stage has named an
artifact (in the scheduler's move that marks the element built:
``pipeline/lua/finish.lua``, given :func:`index_entry`); ``remex artifact
delete`` removes it. Entries expire with the build state
(:data:`~pipeline.scheduler.BUILD_TTL_SECONDS` after their last push; the
scheduler drops them when a build ends, readers too).

The index is a hint, never the truth: every entry listed is looked up on the
artifact server (a deleted or expired artifact drops out), and an artifact
pushed by another tool, or before the index existed, is missing from it
(element names still find it: they are resolved to their URI directly).

Keys (under the scheduler's prefix, ``remex`` by default):

- ``PREFIX:artifacts:bykey``: a sorted set, every score 0, members
  ``KEY PROJECT/NORMAL-NAME``: ``ZRANGEBYLEX`` finds a key prefix;
- ``PREFIX:artifacts:bytime``: the same members scored by the time of their
  last push, to expire old ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.spec import artifact_uri

__all__ = ["ArtifactIndex", "ArtifactRef", "index_entry", "parse_ref"]

_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """An artifact as BuildStream names it: ``PROJECT/NORMAL-NAME/KEY``."""

    project: str
    normal_name: str
    cache_key: str

    @property
    def uri(self) -> str:
        """Its Remote Asset URI."""
        return artifact_uri(self.project, self.normal_name, self.cache_key)

    def __str__(self) -> str:
        return f"{self.project}/{self.normal_name}/{self.cache_key}"


def parse_ref(text: str) -> ArtifactRef | None:
    """``PROJECT/NORMAL-NAME/KEY`` with a full 64-digit key, else None."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    project, name, key = parts
    if len(key) != 64 or not _HEX.match(key):
        return None
    return ArtifactRef(project, name, key)


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """BuildStream's artifact globs: ``*`` and ``?`` stay within one ``/``
    part, ``**`` crosses them; every other character is itself."""
    regex: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            regex.append(".*")
            i += 2
            continue
        char = pattern[i]
        regex.append("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char))
        i += 1
    compiled = re.compile("".join(regex), re.DOTALL)
    return lambda text: compiled.fullmatch(text) is not None


class ArtifactIndex:
    """The artifacts pushed lately, by key (see the module docstring).

    Args:
        client: a redis-py client (``decode_responses=True``).
        prefix: the scheduler's key prefix.
        ttl: seconds an entry lasts after its last push.
    """

    def __init__(self, client: Any, *, prefix: str = "remex", ttl: float | None = None) -> None:
        from pipeline.scheduler import BUILD_TTL_SECONDS

        self.redis = client
        self.by_key = f"{prefix}:artifacts:bykey"
        self.by_time = f"{prefix}:artifacts:bytime"
        self.ttl = BUILD_TTL_SECONDS if ttl is None else ttl

    def add(self, ref: ArtifactRef, *, now: float | None = None) -> None:
        """Record that ``ref`` was pushed (now); drop entries past their TTL."""
        when = time.time() if now is None else now
        member = _member(ref)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.by_key, {member: 0})
        pipe.zadd(self.by_time, {member: when})
        pipe.expire(self.by_key, int(self.ttl) + 1)
        pipe.expire(self.by_time, int(self.ttl) + 1)
        pipe.execute()
        self._expire(when)

    def remove(self, ref: ArtifactRef) -> None:
        """Forget ``ref`` (it was deleted)."""
        member = _member(ref)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.by_key, member)
        pipe.zrem(self.by_time, member)
        pipe.execute()

    def with_key_prefix(self, prefix: str, *, now: float | None = None) -> list[ArtifactRef]:
        """The recorded artifacts whose cache key starts with ``prefix``, by key."""
        self._expire(time.time() if now is None else now)
        members = self.redis.zrangebylex(self.by_key, f"[{prefix}", f"({prefix}\xff")
        return [ref for ref in map(_ref, members) if ref is not None]

    def matching(self, pattern: str, *, now: float | None = None) -> list[ArtifactRef]:
        """The recorded artifacts whose ref ``PROJECT/NAME/KEY`` matches the glob."""
        self._expire(time.time() if now is None else now)
        matches = glob_matcher(pattern)
        refs = [ref for ref in map(_ref, self.redis.zrange(self.by_key, 0, -1)) if ref]
        return sorted(ref for ref in refs if matches(str(ref)))

    def _expire(self, now: float) -> None:
        old = self.redis.zrangebyscore(self.by_time, "-inf", now - self.ttl)
        if old:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(self.by_key, *old)
            pipe.zrem(self.by_time, *old)
            pipe.execute()


def _member(ref: ArtifactRef) -> str:
    # Key first: ZRANGEBYLEX over equal scores finds a key prefix.
    return f"{ref.cache_key} {ref.project}/{ref.normal_name}"


def index_entry(ref: ArtifactRef) -> str:
    """``ref``'s member in both sorted sets (what the scheduler's finish adds)."""
    return _member(ref)


def _ref(member: str | bytes) -> ArtifactRef | None:
    text = member.decode() if isinstance(member, bytes) else member
    key, _, rest = text.partition(" ")
    project, _, name = rest.partition("/")
    if not (key and project and name):
        return None  # not written by this module: ignored
    return ArtifactRef(project, name, key)
