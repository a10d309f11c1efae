"""CLI command groups beyond the core ones (registered on import)."""
