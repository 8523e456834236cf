"""Trial side: one training run with fixed parameters (no Ray, no search imports)."""
