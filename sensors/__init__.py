"""Sensors: incoming studies (and, with later issues, model promotion and run failures)."""
