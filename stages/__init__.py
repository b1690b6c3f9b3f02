"""dpo-stages: DPO with a precomputed reference cache (stage one) and a QLoRA policy (stage two)."""

__version__ = "0.1.0"
