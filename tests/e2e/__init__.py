"""End-to-end tests: the whole pipeline with real processes on loopback."""
