"""Course enrollments with capacity limits."""
