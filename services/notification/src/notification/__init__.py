"""Templated notifications outbox."""
