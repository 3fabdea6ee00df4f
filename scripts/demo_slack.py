"""A local stand-in for a Slack incoming webhook, for `make demo`: it keeps what it receives.

Rampart posts Block Kit messages to SLACK_WEBHOOK_URL; the demo points that variable at this
server and prints each message as Slack would show it (``render``). Every POST is answered
200 "ok", as Slack does.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rich.console import Group
from rich.emoji import Emoji
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

# Header text of Rampart's messages (analysis.alert_delivery) -> the kind of alert.
_KINDS = (
    ("Changed by hand", "manual"),
    ("Rolled back", "rollback"),
    ("Canary advanced", "advance"),
    ("Canary completed", "complete"),
    ("Ramp held", "hold"),
    ("Health warning", "health_warning"),
    ("Test alert", "test"),
    ("Shadow verdict", "shadow_verdict"),
)


@dataclass(frozen=True)
class SlackMessage:
    path: str
    payload: dict[str, Any]

    @property
    def header(self) -> str:
        for block in self.payload.get("blocks", []):
            if block.get("type") == "header":
                return str(block.get("text", {}).get("text", ""))
        return str(self.payload.get("text", ""))

    @property
    def kind(self) -> str:
        header = self.header
        return next((kind for marker, kind in _KINDS if marker in header), "other")


def _mrkdwn(text: str) -> str:
    # Slack's *bold* is Markdown's **bold**; emoji shortcodes stay as they are.
    return text.replace("*", "**")


def render(message: SlackMessage, *, channel: str) -> Panel:
    """The message as a terminal panel: header, text, fields and button links."""
    parts: list[Any] = []
    for block in message.payload.get("blocks", []):
        kind = block.get("type")
        if kind == "header":
            parts.append(Text(Emoji.replace(block["text"]["text"]), style="bold"))
        elif kind == "section" and "text" in block:
            parts.append(Markdown(_mrkdwn(block["text"]["text"])))
        elif kind == "section" and "fields" in block:
            fields = [_mrkdwn(field["text"]).replace("\n", ": ", 1) for field in block["fields"]]
            parts.append(Markdown("\n".join(f"- {field}" for field in fields)))
        elif kind == "actions":
            for element in block.get("elements", []):
                if element.get("url"):
                    parts.append(Text(f"[{element['text']['text']}] {element['url']}", "cyan"))
    if not parts:
        parts.append(Text(json.dumps(message.payload)))
    return Panel(
        Group(*parts), title=f"Slack {channel}", title_align="left", border_style="magenta"
    )


class SlackStandIn:
    """Listens on 127.0.0.1:<port>; ``messages`` holds every POST, ``inbox`` the unread ones."""

    def __init__(self, port: int = 0) -> None:
        self.messages: list[SlackMessage] = []
        self.inbox: queue.Queue[SlackMessage] = queue.Queue()
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {"text": raw.decode("utf-8", "replace")}
                message = SlackMessage(path=self.path, payload=payload)
                with stand_in._lock:
                    stand_in.messages.append(message)
                stand_in.inbox.put(message)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="slack-stand-in", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/services/DEMO/ALERTS/rampart") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> SlackStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self, kind: str | None = None) -> list[SlackMessage]:
        with self._lock:
            return [m for m in self.messages if kind is None or m.kind == kind]
