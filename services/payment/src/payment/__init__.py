"""Payment intake with amount validation and idempotency."""
