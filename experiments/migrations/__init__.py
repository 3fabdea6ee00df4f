"""Database migrations of the experiments app."""
