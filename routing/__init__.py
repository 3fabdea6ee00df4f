"""Routing: sticky assignment, the config snapshot, the edge, the proxy and the SDK."""
