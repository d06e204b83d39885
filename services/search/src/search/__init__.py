"""Full-text search over an in-memory index."""
