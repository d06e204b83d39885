"""Lessons and reading-time estimates."""
