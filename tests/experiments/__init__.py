"""Tests of the experiments app."""
