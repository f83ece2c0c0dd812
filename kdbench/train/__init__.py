"""THE training loop, owned by the harness: every method trains under it, unchanged."""
