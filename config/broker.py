"""The embedded broker: kombu's filesystem transport, with messages that appear whole.

kombu's filesystem channel creates a message file under its final name and then writes
into it, holding an advisory lock that the reading side never takes. A worker polling the
folder in between moves and reads a file that is still empty or half written and fails on
its JSON (kombu 5.x; seen as ``JSONDecodeError`` under load in the demo). Here each message
is written to a temporary name the reader ignores (it matches only ``<queue>.msg``) and
renamed into place: ``os.replace`` within one directory is atomic on POSIX, so a reader
sees either no file or the whole message.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


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


class Transport(filesystem.Transport):
    Channel = Channel
