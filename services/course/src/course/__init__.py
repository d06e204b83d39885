"""Course catalogue."""
