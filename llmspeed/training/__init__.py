"""The shared fine-tuning loop and mixed precision (autocast over fp32 master weights, fp16 loss scaling).

The verbs live elsewhere and choose what trains: :func:`llmspeed.finetune` (whole model, linear
weights, a QAT model's latent weights, or an adapter) and :func:`llmspeed.lora.finetune` (an adapter).
"""

from .amp import PRECISIONS, MixedPrecision, check_precision, unsupported_reason
from .loop import FinetuneResult, check_arguments, check_length, set_checkpointing, token_stream, train

__all__ = [
    "PRECISIONS",
    "MixedPrecision",
    "check_precision",
    "unsupported_reason",
    "FinetuneResult",
    "check_arguments",
    "check_length",
    "set_checkpointing",
    "token_stream",
    "train",
]
