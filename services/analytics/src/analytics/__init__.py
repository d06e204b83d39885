"""Event ingestion and per-event statistics."""
