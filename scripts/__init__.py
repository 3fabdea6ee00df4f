"""Developer scripts: the demo and service helpers."""
