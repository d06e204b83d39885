"""Fixtures for the local stack (engine, registry, moto)."""
