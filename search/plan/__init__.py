"""search/plan."""
