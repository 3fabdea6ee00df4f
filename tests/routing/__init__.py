"""Tests for the routing app."""
