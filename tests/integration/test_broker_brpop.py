"""The worker's BRPOP: packed once per order of its queues, the same bytes kombu sends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from kombu.transport import redis as kombu_redis

from pipeline.broker import PRIORITY_STEPS, RedisTransport, message_priority
from pipeline.servers import RedisServer

DB = 13


@pytest.fixture
def channel(redis_server: RedisServer) -> Iterator[Any]:
    conn = kombu.Connection(
        f"redis://{redis_server.address}/{DB}",
        transport=RedisTransport,
        transport_options={"priority_steps": list(PRIORITY_STEPS)},
    )
    chan = conn.channel()
    # (As kombu's poller gives a channel's client its connection.)
    chan.client.connection = chan.client.connection_pool.get_connection()
    try:
        yield chan
    finally:
        chan.client.flushdb()
        conn.release()


def sent_by(chan: Any, start: Any) -> list[bytes]:
    """What ``start(chan)`` writes to the channel's Redis connection."""
    conn = chan.client.connection
    sent: list[bytes] = []
    real = conn.send_packed_command

    def capture(command: Any, check_health: bool = True) -> None:
        parts = command if isinstance(command, list) else [command]
        sent.append(b"".join(bytes(p) for p in parts))

    conn.send_packed_command = capture
    try:
        start(chan)
    finally:
        conn.send_packed_command = real
    chan._in_poll = None
    return sent


def test_brpop_is_the_command_kombu_sends_for_each_order_of_the_queues(channel: Any) -> None:
    # Given a channel consuming two queues
    for queue in ("remex", "remex.host.w1"):
        channel._active_queues.append(queue)
        channel._queue_cycle.update(channel._active_queues)
    ours: list[list[bytes]] = []
    theirs: list[list[bytes]] = []
    for _ in range(3):
        # When it starts a BRPOP (ours, and kombu's own for the same state)
        ours.append(sent_by(channel, lambda c: c._brpop_start()))
        theirs.append(sent_by(channel, lambda c: kombu_redis.Channel._brpop_start(c)))
        # (kombu rotates the queues after each message it takes)
        channel._queue_cycle.rotate(channel._queue_cycle.consume(2)[0])
    # Then every command is kombu's, byte for byte, in both orders of the queues
    assert ours == theirs
    assert ours[0] != ours[1] and ours[0] == ours[2]
    # And it names every priority list of both queues (and the timeout)
    assert ours[0][0].count(b"remex.host.w1") == len(PRIORITY_STEPS)
    # And the packed commands are kept (one per order and connection)
    assert len(channel._brpop_packed) == 2


def test_a_message_is_taken_through_the_cached_brpop(channel: Any) -> None:
    # Given a message of a priority other than 0 on a queue the channel consumes
    conn = channel.connection.client
    queue = kombu.Queue("remex.test", routing_key="remex.test")
    with conn.Producer() as producer:
        producer.publish(
            {"n": 1},
            routing_key="remex.test",
            priority=message_priority(2, "upload"),
            declare=[queue],
            serializer="json",
        )
    got: list[Any] = []
    with conn.Consumer([queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
        # When the worker's loop polls (BRPOP) and reads
        conn.drain_events(timeout=5)
    # Then it received the message
    assert got == [{"n": 1}]


def test_a_channel_publishes_through_one_redis_client(channel: Any) -> None:
    # Given a channel that counts the redis-py clients it makes
    made: list[Any] = []
    real = channel.Client

    def counting(**kwargs: Any) -> Any:
        made.append(real(**kwargs))
        return made[-1]

    channel.Client = counting
    # When it publishes three messages and an event
    message = {"body": "x", "properties": {"priority": 0}, "headers": {}}
    for _ in range(3):
        channel._put("remex.test", message)
    channel._put_fanout("celeryev", message, "task.multi")
    # Then they went through one client
    assert len(made) == 1
    assert channel.client.llen("remex.test") == 3
    # And a new connection pool (kombu makes one after a fork) gets a client of its own
    channel._disconnect_pools()
    channel._put("remex.test", message)
    assert len(made) == 2
    assert channel.client.llen("remex.test") == 4


def test_a_declare_that_makes_a_queue_reads_no_length_a_passive_one_does(channel: Any) -> None:
    # Given a queue with two messages
    queue = kombu.Queue("remex.declared", channel=channel)
    producer = kombu.Producer(channel)
    for _ in range(2):
        producer.publish({"x": 1}, routing_key="remex.declared", serializer="json")
    channel.client.config_resetstat()
    # When a worker declares it, as it does at each start (not passive)
    queue.declare()
    # Then Redis was asked nothing (no LLEN per priority step)
    stats = channel.client.info("commandstats")
    assert "cmdstat_llen" not in stats
    # And a passive declare, a question about the queue, still gets its length
    _, count, _ = channel.queue_declare("remex.declared", passive=True)
    assert count == 2
    assert channel.client.info("commandstats")["cmdstat_llen"]["calls"] == len(PRIORITY_STEPS)
