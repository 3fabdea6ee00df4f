"""The embedded broker: kombu's filesystem transport, with messages and tables that appear whole.

Two races of kombu's filesystem channel (kombu 5.x), both fixed by writing under a name
nobody reads and linking or renaming into place (atomic within one directory on POSIX):

* Messages. kombu creates a message file under its final name and then writes into it,
  holding an advisory lock that the reading side never takes. A worker polling the folder in
  between moves and reads a file that is still empty or half written and fails on its JSON
  (seen as ``JSONDecodeError`` under load in the demo). Here each message is written to a
  temporary name the reader ignores (it matches only ``<queue>.msg``) and renamed into place.
* Exchange tables (the bindings a publisher routes by, ``<exchange>.exchange``). kombu creates
  the table with ``open("wb")`` and only then locks it and writes it. A publisher or a second
  binder that opens it in between takes its lock first and reads an empty file
  (``JSONDecodeError``); a binder that saw no file yet opens it with "wb" too and truncates a
  table another one has already written. Here the first table is written to a unique
  temporary name and hard-linked to the table's name: the link fails if the table exists, so
  a table is never truncated and is seen whole from the moment it exists. Later bindings
  change it in place under kombu's exclusive lock, which its readers wait for (they take the
  shared lock). An empty table is not read as "no bindings": a publisher would then route its
  message to no queue and kombu drops it without a word.
* Bindings already declared. kombu's filesystem transport keeps one broker state per process,
  and a channel skips writing a binding that state already holds. A second thread declaring
  the queue while the first is still writing the table then publishes before the table
  exists, its message routed to no queue and dropped (``queue.Empty`` at the consumer); a
  binding whose write failed is never written by that process. Here a declared binding is
  always written to (or found in) the table before ``queue_bind`` returns.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The same name as kombu's (time first, so the reader's sorted listing keeps order).
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"
        try:
            with open(partial, "wb") as message:
                message.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        exchange = exchange or "amq.direct"
        if not self.state.has_binding(queue, exchange, routing_key):
            super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
            return
        # kombu skips the table here, but its filesystem state is one per process (shared by
        # every connection and data folder): the binding may be another thread's, still
        # being written, or one whose write failed. The table is written, or found, now.
        meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *meta)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        table = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            if not table.exists() and self._create_table(table, binding):
                return
            # The table exists, whole: add the binding under the exclusive lock.
            with open(table, "rb+", buffering=0) as file:
                filesystem.lock(file, filesystem.LOCK_EX)
                try:
                    bindings = [filesystem.exchange_queue_t(*b) for b in _read(file)]
                    if binding not in bindings:
                        bindings.insert(0, binding)
                        file.seek(0)
                        file.write(str_to_bytes(dumps(bindings)))
                        file.truncate()
                finally:
                    filesystem.unlock(file)
        except OSError as exc:
            raise ChannelError(f"Cannot open {table}") from exc

    @staticmethod
    def _create_table(table: Any, binding: Any) -> bool:
        """Create `table` holding `binding`, whole; False if another binder created it first."""
        # Unique per call, not per process: two threads must never share a temporary file.
        partial = table.with_name(f".{table.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps([binding])))
            os.link(partial, table)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        return True


def _read(file: Any) -> Any:
    content = bytes_to_str(file.read())
    # Ours never leaves a table empty; kombu's own channel does if its process dies between
    # open("wb") and the write. Under the exclusive lock that table is rewritten whole.
    return loads(content) if content else []


class Transport(filesystem.Transport):
    Channel = Channel
