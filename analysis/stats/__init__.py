"""Pure statistics engine over sufficient statistics (no framework imports)."""
