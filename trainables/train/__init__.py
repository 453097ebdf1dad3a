"""trainables/train."""
