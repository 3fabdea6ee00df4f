"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slack_sink import SlackSink


@pytest.fixture
def slack() -> Iterator[SlackSink]:
    """A Slack stand-in on a loopback port; ``slack.url(path)`` is a webhook URL."""
    sink = SlackSink().start()
    yield sink
    sink.stop()
