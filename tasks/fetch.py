"""The ``remex.fetch_source`` task: one network source into the source cache.

A fetch node of a build (a spec with ``fetch``, see
:func:`pipeline.stages.fetch.fetch_spec`) is one message on the
``remex.fetch`` queue, consumed by each worker's fetch pool. The task is a
stage task like the others (start, heartbeat, the failure policy): a
permanent :class:`~pipeline.elements.errors.SourceError` (a wrong checksum,
every URL refusing) fails the node and skips the elements that use it; a
transient error is retried with backoff, from the fetch queue (any worker).
The work itself is :func:`pipeline.stages.fetch.fetch_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from pipeline.broker import FETCH_QUEUE, FETCH_STAGE, TASK_NAMES, send_ready
from pipeline.config import network_settings
from pipeline.digest import digest_to_json
from pipeline.spec import BuildSpec
from pipeline.stages import StageContext, State
from pipeline.stages.fetch import (
    ProgressThrottle,
    cache_root,
    fetch_scratch,
    fetch_source,
    redact_url,
)
from tasks.runtime import WorkerRuntime, start_batch
from tasks.stages import Payload, StageTask

__all__ = ["FetchTask", "register_fetch_task"]


class FetchTask(StageTask):
    """The fetch node's one task; a retry goes back to the fetch queue."""

    abstract = True
    stage = FETCH_STAGE

    def retry_queue(self, rt: WorkerRuntime) -> str:
        """Any fetch pool: a download has no data to stay near."""
        return FETCH_QUEUE


def fetch_source_task(self: FetchTask, payload: Payload) -> Payload:
    """Fetch one source into the source cache; finish the node (its elements may start)."""
    rt = self.runtime()
    build, element = payload["build"], payload["element"]

    def run(ctx: StageContext, spec: BuildSpec, state: State) -> State:
        request: Any = spec["fetch"]
        url = redact_url(str((request.get("urls") or [""])[0]))
        owner = f"{request.get('element', '')} {request.get('field', '')}".strip()

        def report(done: int, total: int | None) -> None:
            meta = {"element": owner, "url": url, "done": done, "total": total}
            # Flower shows the task's state and meta (and the event stream the
            # task-progress events); remex status shows the note.
            self.update_state(state="PROGRESS", meta=meta)
            self.progress(payload, url=url, bytes_done=done, bytes_total=total)
            rt.scheduler.note(build, element, {"bytes_done": done, "bytes_total": total})

        throttle = ProgressThrottle(_guarded(report))
        with fetch_scratch(rt.config.cas_dir) as workdir:
            cache_dir = cache_root(rt.config.cas_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
            digest, downloaded = fetch_source(
                ctx,
                request,
                workdir=workdir,
                cache_dir=Path(cache_dir),
                network=network_settings(rt.config),
                progress=throttle,
            )
        throttle.flush()
        return {**state, "source": digest_to_json(digest), "downloaded": downloaded}

    result = self.run_stage(payload, run, last=True)
    state = result["state"]
    info: dict[str, Any] = {
        "source": state.get("source"),
        "downloaded": bool(state.get("downloaded")),
    }
    if (starts := start_batch(rt)) is not None:
        # Finished here: its start, if not recorded yet, goes with the finish.
        info = {**starts.forget(build, element), **info}
    ready = rt.scheduler.finish(build, element, "built", info)
    send_ready(self.app, rt.scheduler, ready)
    return result


def _guarded(report: Any) -> Any:
    def call(done: int, total: int | None) -> None:
        try:
            report(done, total)
        except Exception:  # monitoring must never fail a download
            return

    return call


def register_fetch_task(app: Celery) -> FetchTask:
    """Register ``remex.fetch_source`` on ``app``."""
    task: FetchTask = app.task(
        bind=True, base=FetchTask, name=TASK_NAMES[FETCH_STAGE], stage=FETCH_STAGE
    )(fetch_source_task)
    return task
