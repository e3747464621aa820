"""The layer rule (CONTRIBUTING.md): imports point one way, and only
pipeline/reapi/ talks gRPC.

Every import in the source (module level or inside a function: a lazy import
is still a dependency) is read with ``ast``; none may name a higher layer,
and none outside pipeline/reapi/ (and the generated code under protos/) may
name grpc or a generated ``*_pb2_grpc`` stub module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import its own layer and those below it.
# "a.b" is a module and everything under it, "a.*" only what is under a and
# in no other entry, "=a" the module a alone; the most specific entry wins.
LAYERS: list[tuple[str, ...]] = [
    ("protos",),
    # Leaves every layer shares: the exception root, digests, the build spec,
    # the JSON encoders (keys, kept plans, the scheduler), the package itself
    # (``__version__``).
    ("=pipeline", "pipeline.errors", "pipeline.digest", "pipeline.spec", "pipeline.jsonenc"),
    ("pipeline.cas", "pipeline.reapi"),
    ("pipeline.elements",),
    ("pipeline.stages",),
    ("pipeline.*",),  # the top of pipeline/: scheduler, broker, api, config, stack ...
    ("tasks", "bot"),
    ("cli",),
]
PACKAGES = ("protos", "pipeline", "tasks", "bot", "cli")
# Generated code: its imports are protoc's business.
GENERATED = ("protos/build", "protos/google")

# Imports that point up on purpose, each with the reason. Keep this short.
ALLOWED_UPWARD = {
    # ``pipeline.submit`` ... : the package's facade loads the API on first use.
    ("pipeline/__init__.py", "pipeline.api"),
}
# Files outside pipeline/reapi/ allowed to import grpc.
GRPC_EXCEPTIONS: set[str] = set()


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a dotted module name (None: not remex's)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith(".*"):
                matches, specificity = module.startswith(prefix[:-1]), 1
            elif prefix.startswith("="):
                matches, specificity = module == prefix[1:], 100
            else:
                matches = module == prefix or module.startswith(prefix + ".")
                specificity = 2 + prefix.count(".")
            if matches and (best is None or specificity > best[0]):
                best = (specificity, index)
    return None if best is None else best[1]


def source_files() -> Iterator[tuple[str, str]]:
    """(path relative to the repository, dotted module name) of every source file."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield rel, ".".join(parts)


def imported_modules(path: Path, module: str) -> Iterator[str]:
    """Every module an import statement in ``path`` names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop] if drop else anchor
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # ``from pipeline import stages`` imports pipeline.stages.
            for alias in node.names:
                yield f"{base}.{alias.name}"


def upward_imports() -> list[str]:
    problems = []
    for rel, module in source_files():
        own = layer_of(module)
        assert own is not None, module
        for target in imported_modules(ROOT / rel, module):
            theirs = layer_of(target)
            if theirs is None or theirs <= own or (rel, target) in ALLOWED_UPWARD:
                continue
            # ``from pipeline import __version__`` names an attribute, not a module.
            if not _is_module(target):
                continue
            problems.append(
                f"{rel} (layer {own}) imports {target} (layer {theirs}: {LAYERS[theirs]})"
            )
    return problems


def grpc_imports() -> list[str]:
    problems = []
    for rel, module in source_files():
        if rel.startswith("pipeline/reapi/") or rel in GRPC_EXCEPTIONS:
            continue
        for target in imported_modules(ROOT / rel, module):
            top = target.split(".")[0]
            if top == "grpc" or target.endswith("_pb2_grpc"):
                problems.append(f"{rel} imports {target}: only pipeline/reapi/ may use grpc")
    return problems


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_layer_imports_a_higher_one() -> None:
    assert upward_imports() == []


def test_only_pipeline_reapi_imports_grpc() -> None:
    assert grpc_imports() == []


def test_the_rule_is_checked_where_it_matters() -> None:
    # The check itself must be able to fail: a stage importing the scheduler,
    # the CLI's own module and a gRPC stub are each seen.
    assert layer_of("pipeline.stages.run") < layer_of("pipeline.scheduler")  # type: ignore[operator]
    assert layer_of("pipeline.scheduler") < layer_of("tasks.app")  # type: ignore[operator]
    assert layer_of("tasks.app") < layer_of("cli.main")  # type: ignore[operator]
    assert layer_of("pipeline.reapi.cas") < layer_of("pipeline.elements.keys")  # type: ignore[operator]
    assert layer_of("pipeline.errors") < layer_of("pipeline.cas.store")  # type: ignore[operator]
    assert layer_of("click") is None
    modules = {m for rel, m in source_files()}
    assert {"pipeline.stages.policy", "tasks.stages", "cli.main", "bot.main"} <= modules
    assert not any(m.startswith("protos.build") for m in modules)


def test_no_shipped_code_or_benchmark_imports_the_tests() -> None:
    # bench/ and every package run without the test suite: shared test
    # helpers live in pipeline/testing/.
    offenders = []
    for folder in ("bench", *PACKAGES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            offenders += [
                f"{rel}: {target}"
                for target in imported_modules(path, module)
                if target.split(".")[0] == "tests"
            ]
    assert offenders == []
