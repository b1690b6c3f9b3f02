"""Tools around the two stages: sweep, compare, plan, sample, demo, cache verify and the TRL bridges."""
