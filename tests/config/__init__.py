"""Tests of project configuration."""
