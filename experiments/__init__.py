"""Experiments: the source of truth for experiments, variants, metrics, ramps, keys and audit."""
