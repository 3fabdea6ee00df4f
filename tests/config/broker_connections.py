"""Connections to a filesystem broker in a test's folder, through ours or kombu's transport."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection

OURS = "config.broker:Transport"
KOMBU = "kombu.transport.filesystem:Transport"


def filesystem_connection(folder: Path, transport: str = OURS) -> Connection:
    for sub in ("out", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return Connection(
        "filesystem://",
        transport=transport,
        transport_options={
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # Consumers poll without pause, as a busy worker does.
            "polling_interval": 0.0,
        },
    )
