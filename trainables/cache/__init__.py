"""trainables/cache."""
