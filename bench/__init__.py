"""Benchmarks, run by hand: each script prints its figures and its ratio against a baseline."""
