"""Reward-modeling methods of "Secrets of RLHF Part II" (arXiv 2401.06080), one idea per module.

- ``strength``: preference strength from an ensemble of reward models (mean / std of reward differences).
- ``noisy``: flip, drop or soften likely-wrong pairs selected by strength (through loss arguments and data columns).
- ``margin``: adaptive Bradley–Terry margin ``λ · strength_mean``.
- ``contrastive``: SimCSE and SwAV auxiliary losses on reward-head features.
- ``metarm``: the MetaRM look-ahead step on a distribution-shifted batch.

Every module works on tensors / plain rows and is independent of the trainer.
"""
