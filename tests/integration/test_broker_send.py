"""What sending an element costs the sender: no result subscription (issue 17)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from celery import Celery

from pipeline.broker import (
    DEFAULT_QUEUE,
    SEND_BATCH,
    make_celery,
    queue_lists,
    send_element,
    send_ready,
)
from pipeline.config import RemexConfig
from pipeline.scheduler import Scheduler
from pipeline.servers import RedisServer
from tests.integration.test_scheduler import scheduler_on, spec

DB = 9


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    yield from scheduler_on(redis_server, DB)


@pytest.fixture
def celery_app(redis_server: RedisServer) -> Iterator[Celery]:
    # A sender as `remex build` is one: the stage tasks are not registered
    # here, they are named by string; the result backend is Redis.
    url = f"redis://{redis_server.address}/{DB}"
    app = make_celery(RemexConfig(broker_url=url, result_backend=url))
    yield app
    app.close()


def test_sending_chains_subscribes_to_no_result_channel(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a build of three independent elements
    names = ["a", "b", "c"]
    build, ready = scheduler.create_build([spec(n) for n in names], {n: [] for n in names}, [], {})
    assert sorted(ready) == names
    scheduler.redis.config_resetstat()
    # When the sender sends their chains
    for name in names:
        assert send_element(celery_app, scheduler, build, name) == "sent"
    # Then each first message says its result is ignored, and so do the
    # chain's later stages (their options ride in the message)
    messages = [
        json.loads(raw)
        for key in queue_lists(DEFAULT_QUEUE)
        for raw in scheduler.redis.lrange(key, 0, -1)
    ]
    assert len(messages) == 3
    for message in messages:
        assert message["headers"]["ignore_result"] is True
        raw = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            raw = base64.b64decode(raw)
        body = json.loads(raw)
        later = body[2]["chain"]
        assert len(later) == 4
        assert all(sig["options"]["ignore_result"] is True for sig in later)
    # And the sender subscribed to no result channel (Celery's Redis backend
    # would: one SUBSCRIBE per chain sent)
    stats = scheduler.redis.info("commandstats")
    assert "cmdstat_subscribe" not in stats
    assert stats["cmdstat_lpush"]["calls"] == 3


def test_a_list_of_ready_elements_is_sent_in_batches(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a build of 20 independent elements, more than one batch
    names = [f"e{i:02d}" for i in range(20)]
    assert len(names) > SEND_BATCH
    build, ready = scheduler.create_build([spec(n) for n in names], {n: [] for n in names}, [], {})
    scheduler.redis.config_resetstat()
    # When they are sent as one list (what a finishing element or submit does)
    send_ready(celery_app, scheduler, [(build, n) for n in ready])
    stats = scheduler.redis.info("commandstats")
    # Then every element's first message is queued once, under the task id
    # the scheduler recorded for it
    ids = [
        json.loads(raw)["headers"]["id"]
        for key in queue_lists(DEFAULT_QUEUE)
        for raw in scheduler.redis.lrange(key, 0, -1)
    ]
    assert sorted(ids) == sorted(scheduler.info(build, n)["task_ids"][0] for n in names)
    assert all(scheduler.state(build, n) == "queued" for n in names)
    # And the specs and the infos were read in one command each (the
    # script that records the sends), not one per element
    assert stats["cmdstat_hmget"]["calls"] == 2
    assert "cmdstat_hget" not in stats
