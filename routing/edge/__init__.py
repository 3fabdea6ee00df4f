"""The edge: the plain ASGI apps of the hot path and the HTTP protocol that serves them."""
