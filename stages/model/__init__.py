"""Model plumbing: loading (sharded, NF4, adapters), the process group and its collectives, log-probs, memory."""
