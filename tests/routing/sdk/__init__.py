"""Tests of the Python SDK (rampart_sdk) against a real edge and mock servers."""
