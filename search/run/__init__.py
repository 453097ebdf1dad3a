"""search/run."""
