"""Artifact arguments as ``bst artifact`` takes them: element names, refs
(with BuildStream's wildcards) and cache keys; and the withdrawn-artifact marker."""

from __future__ import annotations

import pytest

from pipeline.artifact_index import ArtifactRef, glob_matcher, parse_ref
from pipeline.artifacts import ArtifactArgumentError, classify_argument
from pipeline.spec import artifact_uri
from pipeline.stages.artifacts import WITHDRAWN_DIGEST, is_withdrawn

KEY = "ab" * 32


def test_a_ref_is_project_element_and_a_full_key() -> None:
    ref = parse_ref(f"proj/app/{KEY}")
    assert ref == ArtifactRef("proj", "app", KEY)
    assert ref is not None and ref.uri == artifact_uri("proj", "app", KEY)
    assert str(ref) == f"proj/app/{KEY}"
    # a short key, a fourth part or an empty part is no ref
    for text in ("proj/app/abcd", f"a/proj/app/{KEY}", f"/app/{KEY}", f"proj/app/{KEY.upper()}"):
        assert parse_ref(text) is None, text


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("app.bst", "element"),
        ("core/app.bst", "element"),
        (f"proj/app/{KEY}", "ref"),
        ("proj/app/ab*", "pattern"),
        ("proj/**", "pattern"),
        ("abc123", "key"),
        (KEY, "key"),
    ],
)
def test_each_argument_is_classified(text: str, kind: str) -> None:
    assert classify_argument(text) == kind


@pytest.mark.parametrize("text", ["app", "not-a-key", "ABC", "a" * 65])
def test_anything_else_is_bad_usage(text: str) -> None:
    with pytest.raises(ArtifactArgumentError, match="is not an element"):
        classify_argument(text)


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("proj/app/*", f"proj/app/{KEY}", True),
        ("proj/*/ab*", f"proj/app/{KEY}", True),
        ("proj/*", f"proj/app/{KEY}", False),  # * stays within one part
        ("proj/**", f"proj/app/{KEY}", True),  # ** crosses parts
        ("proj/ap?/*", f"proj/app/{KEY}", True),
        ("proj/ap?/*", f"proj/apps/{KEY}", False),
        ("pro.j/**", f"proj/app/{KEY}", False),  # . is itself
        ("other/**", f"proj/app/{KEY}", False),
    ],
)
def test_bst_wildcards(pattern: str, text: str, matches: bool) -> None:
    assert glob_matcher(pattern)(text) is matches


def test_the_withdrawn_marker_is_no_artifact_tree() -> None:
    from pipeline.digest import EMPTY_DIGEST

    assert is_withdrawn(WITHDRAWN_DIGEST)
    assert not is_withdrawn(EMPTY_DIGEST)
