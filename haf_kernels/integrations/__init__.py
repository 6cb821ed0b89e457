"""Integrations of ``haf_kernels`` with other training libraries; each is an optional extra.

- ``haf_kernels.integrations.trl``: ``HafConfig`` / ``HafTrainer``, the HaF reward-model loss inside TRL's training
  loop (``pip install haf_kernels[trl]``).

Nothing is imported here, so ``import haf_kernels.integrations`` works without any of those libraries.
"""
