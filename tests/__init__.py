"""Rampart test suite; mirrors the apps."""
