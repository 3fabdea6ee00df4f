"""Recording off the hot path: exposures, observations, per-user outcomes, histograms, metrics."""
