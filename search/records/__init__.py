"""search/records."""
