"""The embedded broker delivers each message whole while a producer is still writing others."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.conf import settings

from tests.config.broker_connections import filesystem_connection

MESSAGES = 200
# Large enough that writing one takes many write() calls' worth of time.
PAYLOAD_BYTES = 1024 * 1024


def test_a_consumer_polling_during_writes_reads_every_message_whole(tmp_path: Path) -> None:
    received: list[dict[str, object]] = []
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            with filesystem_connection(tmp_path) as connection:
                queue = connection.SimpleQueue("race")
                while len(received) < MESSAGES:
                    message = queue.get(block=True, timeout=30)
                    received.append(message.payload)
                    message.ack()
                queue.close()
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    # Consumer and producer declare the queue at once (its exchange table races are
    # test_broker_tables.py's subject).
    consumer = threading.Thread(target=consume)
    consumer.start()
    with filesystem_connection(tmp_path) as connection:
        queue = connection.SimpleQueue("race")
        for index in range(MESSAGES):
            queue.put({"index": index, "filler": "x" * PAYLOAD_BYTES})
        queue.close()
    consumer.join(60)

    assert not failures, failures
    assert sorted(int(str(m["index"])) for m in received) == list(range(MESSAGES))
    assert all(len(str(m["filler"])) == PAYLOAD_BYTES for m in received)
    assert not list((tmp_path / "out").glob("*.partial"))


def test_the_embedded_settings_use_the_whole_message_transport() -> None:
    if settings.CELERY_BROKER_URL != "filesystem://":
        pytest.skip("this run uses a broker server")
    assert settings.CELERY_BROKER_TRANSPORT == "config.broker:Transport"
