"""Lean HaF reward-model training loop: model wrapper, data, synthetic task, trainer, CLI, demo."""
