"""trainables/model."""
