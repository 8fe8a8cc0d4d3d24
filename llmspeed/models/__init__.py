"""Ready-made models: the embedded real SmolLM2 and tiny random models built from a config and a seed."""

from .embedded import smollm2
from .tiny import ARCHITECTURES, llama_1b_random, tiny

__all__ = ["smollm2", "tiny", "llama_1b_random", "ARCHITECTURES"]
