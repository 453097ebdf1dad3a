"""trainables/data."""
