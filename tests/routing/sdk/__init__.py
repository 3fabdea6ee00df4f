"""Tests of the Python SDK (routing.sdk) against a real edge and mock servers."""
