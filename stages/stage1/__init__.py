"""Stage one: the frozen reference scores every reply once and writes the cache."""
