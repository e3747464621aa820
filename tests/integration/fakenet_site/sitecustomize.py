"""A fake network source kind, ``fakenet``, for the processes of a test stack.

This folder goes first on ``PYTHONPATH`` of the stack's processes (workers,
the CLI), so each registers the kind when Python starts; remex itself never
ships it. ``url: fakenet:///ABSOLUTE/PATH`` "downloads" that file: each
download appends a line to ``PATH.log`` (the access log) and reads the file
in chunks, ``delay`` seconds apart (a slow server), into the fetch's scratch
folder; ``ref`` is the file's sha256. The staged tree is the one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

with contextlib.suppress(ImportError):
    from pipeline.cas import LocalCas, import_directory
    from pipeline.digest import Digest
    from pipeline.elements import sources as _sources
    from pipeline.elements.errors import SourceError
    from pipeline.elements.nodes import MappingNode, Mark
    from pipeline.elements.sources import (
        FetchContext,
        FetchRequest,
        NetworkSource,
        SourceContext,
        source_cache_key,
    )
    from pipeline.elements.sources.helpers import COMMON_KEYS, source_directory

    CHUNK = 64 * 1024

    class FakeNetSource(NetworkSource):
        """``fakenet``: one file by absolute path, downloaded slowly if asked."""

        kind: ClassVar[str] = "fakenet"

        def __init__(
            self, *, url: str, ref: str, delay: float, directory: str, mark: Mark, field: str
        ) -> None:
            super().__init__(directory=directory, mark=mark, field=field)
            self.url = url
            self.ref = ref
            self.delay = delay

        @classmethod
        def load(cls, node: MappingNode, ctx: SourceContext) -> FakeNetSource:
            directory = source_directory(node)
            node.validate_keys(("url", "ref", "delay", *COMMON_KEYS))
            delay = node.get_str("delay") or "0"
            return cls(
                url=node.require_str("url").as_str(),
                ref=node.require_str("ref").as_str(),
                delay=float(delay),
                directory=directory,
                mark=node.mark,
                field=node.path,
            )

        def content_key(self) -> str:
            return self.ref

        def fetch_request(self, element: str, index: int, file: str) -> FetchRequest:
            return FetchRequest(
                kind=self.kind,
                key=source_cache_key(self.kind, {"url": self.url, "ref": self.ref}),
                element=element,
                index=index,
                field=self.field,
                file=file,
                urls=[self.url],
                config={"ref": self.ref, "delay": self.delay},
            )

        @classmethod
        def fetch(cls, request: FetchRequest, ctx: FetchContext) -> Digest:
            path = Path(request["urls"][0].removeprefix("fakenet://"))
            with open(f"{path}.log", "a") as log:
                log.write(json.dumps({"pid": os.getpid(), "time": time.time()}) + "\n")
            total = path.stat().st_size
            folder = ctx.workdir / "tree"
            folder.mkdir()
            part = ctx.workdir / (path.name + ".part")
            hasher = hashlib.sha256()
            done = 0
            with open(path, "rb") as src, open(part, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    ctx.progress(done, total)
                    time.sleep(float(request["config"].get("delay") or 0))
            expected = request["config"]["ref"]
            if hasher.hexdigest() != expected:
                raise SourceError(
                    f"{request['element']} source #{request['index'] + 1}: {path.name}: "
                    f"expected sha256 {expected}, got {hasher.hexdigest()}"
                )
            os.replace(part, folder / path.name)
            return import_directory(ctx.cas, folder)

        def stage(self, cas: LocalCas, workdir: Path) -> Digest:
            raise AssertionError("the submitter must not download")

    def _register() -> None:
        _sources.SOURCE_KINDS["fakenet"] = FakeNetSource

    _register()

__all__: list[Any] = []
