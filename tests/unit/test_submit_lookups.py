"""submit's artifact lookups (api.cached_elements): only elements whose staged
dependencies are all cached are looked up, and a lookup finds what is there."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.api import cached_elements
from pipeline.cas import LocalCas
from pipeline.digest import digest_of
from pipeline.elements import load_project


class FakeAssets:
    """An artifact server holding artifacts under some URIs; records each lookup."""

    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def fetch_directory(self, uris: list[str]) -> Any:
        with self.lock:
            self.asked.extend(uris)
        return SimpleNamespace(digest=digest_of(b"artifact")) if uris[0] in self.present else None


def test_only_elements_whose_dependencies_are_cached_are_looked_up(tmp_path: Path) -> None:
    # Given base <- a <- b, base <- c, and a stack over b and c
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text("name: p\nmin-version: 2.0\nelement-path: elements\n")
    files = {
        "base.bst": "kind: stack\n",
        "a.bst": "kind: manual\nbuild-depends: [base.bst]\n",
        "b.bst": "kind: manual\nbuild-depends: [a.bst]\n",
        "c.bst": "kind: manual\nbuild-depends: [base.bst]\n",
        "all.bst": "kind: stack\ndepends: [b.bst, c.bst]\n",
    }
    for name, text in files.items():
        (root / "elements" / name).write_text(text)
    elements = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["all.bst"])
    specs = [element.build_spec([]) for element in elements]
    uri = {spec["element"]: spec["artifact_uri"] for spec in specs}
    # And an artifact server with base, b and c (a's artifact is gone)
    assets = FakeAssets({uri["base.bst"], uri["b.bst"], uri["c.bst"]})

    # When submit looks the artifacts up
    found = cached_elements(SimpleNamespace(assets=assets), elements, specs)  # type: ignore[arg-type]

    # Then base and c are cached; a is not; b (waiting on a) and all (on b) were not asked
    assert found == {"base.bst", "c.bst"}
    assert sorted(assets.asked) == sorted([uri["base.bst"], uri["a.bst"], uri["c.bst"]])


def _chain_project(tmp_path: Path) -> tuple[list[Any], list[Any]]:
    """base <- e0 <- e1 <- e2, base <- side, and a stack over e2 and side."""
    root = tmp_path / "p"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text("name: p\nmin-version: 2.0\nelement-path: elements\n")
    files = {
        "base.bst": "kind: stack\n",
        "e0.bst": "kind: manual\nbuild-depends: [base.bst]\n",
        "e1.bst": "kind: manual\nbuild-depends: [e0.bst]\n",
        "e2.bst": "kind: manual\nbuild-depends: [e1.bst, base.bst]\n",
        "side.bst": "kind: manual\nbuild-depends: [base.bst]\n",
        "all.bst": "kind: stack\ndepends: [e2.bst, side.bst]\n",
    }
    for name, text in files.items():
        (root / "elements" / name).write_text(text)
    elements = load_project(root, cas=LocalCas(tmp_path / "cas")).load_targets(["all.bst"])
    return elements, [element.build_spec([]) for element in elements]


def test_a_cached_project_is_found_wave_after_wave(tmp_path: Path) -> None:
    # Given an artifact server with every artifact of a chain
    elements, specs = _chain_project(tmp_path)
    assets = FakeAssets({spec["artifact_uri"] for spec in specs})

    # When submit looks them up
    found = cached_elements(SimpleNamespace(assets=assets), elements, specs)  # type: ignore[arg-type]

    # Then every element is found, each asked once
    assert found == {e.name for e in elements}
    assert sorted(assets.asked) == sorted(spec["artifact_uri"] for spec in specs)


def test_a_new_project_asks_only_for_elements_without_dependencies(tmp_path: Path) -> None:
    # Given an empty artifact server
    elements, specs = _chain_project(tmp_path)
    assets = FakeAssets(set())

    # When submit looks the artifacts up
    found = cached_elements(SimpleNamespace(assets=assets), elements, specs)  # type: ignore[arg-type]

    # Then nothing is found and only base (which depends on nothing) was asked
    assert found == set()
    assert assets.asked == [specs[0]["artifact_uri"]]
    assert specs[0]["element"] == "base.bst"
