"""search/report."""
