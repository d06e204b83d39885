"""Upload metadata and thumbnail sizing."""
