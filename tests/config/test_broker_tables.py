"""The embedded broker's exchange tables, declared at once by several connections.

kombu's filesystem channel creates a table (``<exchange>.exchange``, the bindings a publisher
routes by) with ``open("wb")`` and only then locks and writes it; and it skips writing a
binding its process-wide state already holds, even while another thread is still writing it.
The paused-creator tests stop the creating thread at either point, as a scheduler may, while a
second connection declares the same queue and publishes: with kombu's own transport the second
one fails with ``JSONDecodeError``, or its message goes to no queue and is lost; with ours both
arrive. The last test runs many rounds of threads declaring a new queue at once and publishing
to it, and counts every message (kombu's transport fails it in about half the runs, either way).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu.transport import filesystem

from tests.config.broker_connections import KOMBU, OURS, filesystem_connection


def _publish(folder: Path, transport: str, queue_name: str, body: dict[str, Any]) -> None:
    with filesystem_connection(folder, transport) as connection:
        queue = connection.SimpleQueue(queue_name)  # declares the exchange, queue and binding
        queue.put(body)
        queue.close()


def _drain(folder: Path, transport: str, queue_name: str, expected: int) -> list[Any]:
    received = []
    with filesystem_connection(folder, transport) as connection:
        queue = connection.SimpleQueue(queue_name)
        for _ in range(expected):
            message = queue.get(block=True, timeout=10)
            received.append(message.payload)
            message.ack()
        with pytest.raises(Empty):
            queue.get_nowait()
        queue.close()
    return received


class _Pause:
    """Stops the creating thread at one point of its declare until the test resumes it."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.armed = False
        self.paused = threading.Event()
        self.resume = threading.Event()

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.armed and threading.current_thread() is self.thread:
                self.armed = False
                self.paused.set()
                self.resume.wait(10)
            return real(*args, **kwargs)

        return wrapper


@pytest.fixture
def pause() -> Iterator[_Pause]:
    point = _Pause()
    yield point
    point.resume.set()


def _race_a_declare_against_its_creator(
    folder: Path, transport: str, pause: _Pause, *, at: str
) -> tuple[BaseException | None, list[Any]]:
    """The creator declares a new queue and is paused at `at`: "lock", its first file lock
    (kombu's channel has created the table, empty, and not yet locked it), or "bind", the
    start of its table write (the binding is already in kombu's process-wide state). Meanwhile
    a second connection declares the same queue and publishes; then the creator resumes and
    publishes. Returns the second one's error, if any, and the messages that arrived."""
    name = f"jobs-{uuid.uuid4().hex[:8]}"  # kombu's binding state outlives a test
    declared = threading.Event()
    creator_errors: list[BaseException] = []

    def create() -> None:
        try:
            with filesystem_connection(folder, transport) as connection:
                channel = connection.default_channel
                if at == "bind":
                    channel._queue_bind = pause.wrap(channel._queue_bind)
                pause.armed = True
                queue = connection.SimpleQueue(name, channel=channel)
                pause.armed = False
                declared.set()
                queue.put({"from": "creator"})
                queue.close()
        except BaseException as error:  # reported by the main thread
            creator_errors.append(error)
            declared.set()

    pause.thread = threading.Thread(target=create)
    pause.thread.start()
    # Ours declares without a lock, so it may never stop at "lock".
    while not (pause.paused.is_set() or declared.wait(0.001)):
        pass
    error: BaseException | None = None
    try:
        _publish(folder, transport, name, {"from": "second"})
    except Exception as exc:  # the outcome the tests compare
        error = exc
    pause.resume.set()
    pause.thread.join(20)
    assert not pause.thread.is_alive()
    assert not creator_errors, creator_errors
    with filesystem_connection(folder, transport) as connection:
        queue = connection.SimpleQueue(name)
        received = []
        with contextlib.suppress(Empty):  # every publish has returned: no waiting
            while True:
                message = queue.get_nowait()
                received.append(message.payload["from"])
                message.ack()
        queue.close()
    return error, sorted(received)


@pytest.fixture
def paused_lock(monkeypatch: pytest.MonkeyPatch, pause: _Pause) -> _Pause:
    monkeypatch.setattr(filesystem, "lock", pause.wrap(filesystem.lock))
    return pause


def test_kombus_own_transport_reads_a_table_its_creator_has_not_written(
    tmp_path: Path, paused_lock: _Pause
) -> None:
    error, received = _race_a_declare_against_its_creator(tmp_path, KOMBU, paused_lock, at="lock")
    assert paused_lock.paused.is_set()
    assert isinstance(error, json.JSONDecodeError), error
    assert received == ["creator"]


def test_kombus_own_transport_drops_a_message_published_before_the_table_exists(
    tmp_path: Path, pause: _Pause
) -> None:
    error, received = _race_a_declare_against_its_creator(tmp_path, KOMBU, pause, at="bind")
    assert pause.paused.is_set() and error is None
    assert received == ["creator"]  # the second one's message went to no queue


@pytest.mark.parametrize("at", ["lock", "bind"])
def test_ours_declares_and_delivers_while_the_creator_is_paused(
    tmp_path: Path, paused_lock: _Pause, at: str
) -> None:
    error, received = _race_a_declare_against_its_creator(tmp_path, OURS, paused_lock, at=at)
    assert error is None
    assert received == ["creator", "second"]
    (table,) = (tmp_path / "control").iterdir()  # no temporary file left behind
    name = table.name.removesuffix(".exchange")
    assert json.loads(table.read_text()) == [[name, "", name]]


def test_a_table_left_empty_by_a_dead_kombu_channel_is_rewritten_at_the_next_declare(
    tmp_path: Path,
) -> None:
    # kombu's channel opens the table with "wb" before writing it; its process died there.
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    (tmp_path / "control").mkdir(parents=True)
    (tmp_path / "control" / f"{name}.exchange").write_bytes(b"")
    _publish(tmp_path, OURS, name, {"from": "after"})
    assert [m["from"] for m in _drain(tmp_path, OURS, name, expected=1)] == ["after"]
    table = json.loads((tmp_path / "control" / f"{name}.exchange").read_text())
    assert table == [[name, "", name]]


THREADS = 6
ROUNDS = 40


def test_threads_declaring_new_queues_at_once_lose_no_message(
    tmp_path: Path, transport: str = OURS
) -> None:
    """Each round a new queue (so a new table) is declared by every thread at once, and each
    thread then publishes to it; every message arrives whole. A short switch interval makes the
    threads interleave inside kombu's code (with kombu's transport this fails within a few
    rounds)."""
    prefix = f"q{uuid.uuid4().hex[:8]}-"
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for round_ in range(ROUNDS):
                barrier.wait(20)
                body = {"worker": worker, "round": round_}
                _publish(tmp_path, transport, f"{prefix}{round_}", body)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            barrier.abort()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    for round_ in range(ROUNDS):
        received = _drain(tmp_path, transport, f"{prefix}{round_}", expected=THREADS)
        assert sorted(m["worker"] for m in received) == list(range(THREADS))
        assert {m["round"] for m in received} == {round_}
        table = json.loads((tmp_path / "control" / f"{prefix}{round_}.exchange").read_text())
        assert table == [[f"{prefix}{round_}", "", f"{prefix}{round_}"]]
    assert not list((tmp_path / "control").glob(".*.partial"))
