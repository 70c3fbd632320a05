"""Pre-training tasks (stage 2: the bridge/memory fusion objectives and their held-out evaluation)."""
