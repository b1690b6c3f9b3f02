"""Settings: the frozen groups that check themselves, the commands composed of them, and the YAML/flag reader.
Torch-free (`dpo --help` imports no torch)."""
