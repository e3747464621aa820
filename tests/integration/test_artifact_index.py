"""The artifact index on a real Redis: key prefixes, patterns, removal, expiry."""

from __future__ import annotations

import uuid

import redis

from pipeline.artifact_index import ArtifactIndex, ArtifactRef
from pipeline.servers import RedisServer


def index_on(server: RedisServer, ttl: float = 3600.0) -> ArtifactIndex:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    return ArtifactIndex(client, prefix=f"test-{uuid.uuid4().hex[:8]}", ttl=ttl)


def test_prefixes_and_patterns_find_what_was_pushed(redis_server: RedisServer) -> None:
    # Given three artifacts pushed
    index = index_on(redis_server)
    a = ArtifactRef("proj", "app", "ab" + "0" * 62)
    b = ArtifactRef("proj", "lib", "ab" + "1" * 62)
    c = ArtifactRef("other", "app", "cd" + "0" * 62)
    for ref in (a, b, c):
        index.add(ref)
    index.add(a)  # pushed again: still one entry
    # Then a key prefix finds those with the key, in key order
    assert index.with_key_prefix("ab") == [a, b]
    assert index.with_key_prefix("ab1") == [b]
    assert index.with_key_prefix(c.cache_key) == [c]
    assert index.with_key_prefix("ef") == []
    # And patterns match refs as bst does
    assert index.matching("proj/**") == [a, b]
    assert index.matching("*/app/*") == [c, a]
    # And a removed one is gone
    index.remove(a)
    assert index.with_key_prefix("ab") == [b]


def test_entries_expire_after_the_ttl_since_their_last_push(redis_server: RedisServer) -> None:
    index = index_on(redis_server, ttl=100.0)
    old, new = ArtifactRef("p", "old", "1" * 64), ArtifactRef("p", "new", "2" * 64)
    index.add(old, now=1000.0)
    index.add(new, now=1050.0)
    # A push 150 s after the first: the first is past its 100 s
    index.add(new, now=1150.0)
    assert index.matching("p/**", now=1150.0) == [new]
    # And, looked up long after, nothing is left
    assert index.with_key_prefix("", now=1300.0) == []
