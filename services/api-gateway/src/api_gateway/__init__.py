"""Edge router: maps public paths to upstream services."""
