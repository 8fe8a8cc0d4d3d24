"""Ready-made models: the embedded real SmolLM2, tiny random models built from a config and a seed, and
:func:`from_pretrained` (a local transformers folder, optionally quantized while it is read)."""

from .embedded import smollm2
from .pretrained import from_pretrained
from .tiny import ARCHITECTURES, llama_1b_random, tiny

__all__ = ["smollm2", "tiny", "llama_1b_random", "ARCHITECTURES", "from_pretrained"]
