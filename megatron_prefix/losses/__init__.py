"""Preference losses (pure torch functions, one registry)."""
