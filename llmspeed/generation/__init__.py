"""Continuous-batching generation: paged KV cache, iteration-level scheduler, per-request sampling.

``Generator(model).generate_batched(prompts, SamplingParams(...))`` is the entry point; the parts
(:class:`BlockManager`, :class:`Scheduler`, :class:`PagedAttention`) are usable on their own.
"""

from .block_manager import BlockManager
from .engine import Generator
from .kv_cache import PagedAttention, PagedKVCache
from .outputs import GenerationOutput, RequestMetrics, RunStats, StreamEvent
from .sampling import SamplingParams
from .scheduler import Scheduler
from .structured_params import StructuredOutputsParams

__all__ = [
    "Generator",
    "SamplingParams",
    "StructuredOutputsParams",
    "GenerationOutput",
    "RequestMetrics",
    "RunStats",
    "StreamEvent",
    "BlockManager",
    "Scheduler",
    "PagedAttention",
    "PagedKVCache",
]
