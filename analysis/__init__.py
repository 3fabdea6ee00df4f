"""Analysis: statistics, aggregation, guardrail decisions, rollback and ramp actions, alerts."""
