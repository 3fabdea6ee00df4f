"""Database migrations of the routing app."""
