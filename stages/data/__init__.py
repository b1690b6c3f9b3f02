"""Data: reading preference rows from files, saved datasets and the Hub, validating them, tokenizing them."""
