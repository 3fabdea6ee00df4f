"""Tests of the pure statistics engine."""
