"""The objective: the DPO family as pure functions of log-prob tensors, and its torch-free names and mixtures."""
