"""Routing: the config snapshot and three rooms, the edge, the proxy and recording (observe)."""
