"""haf_kernels: fused HaF-RM / DPO-family losses that never materialise full-vocab logits."""

from .logprobs import linear_logprobs, sequence_logprobs
from .losses import HafLoss, HafLossOutput, fused_haf_loss
from .vocab_parallel import VocabParallel

__all__ = ["fused_haf_loss", "HafLoss", "HafLossOutput", "linear_logprobs", "sequence_logprobs", "VocabParallel"]
__version__ = "0.1.0"
