"""The one model-wrapper protocol every llmspeed module programs against.

Precision casting, quantization, LoRA and the batching generator never touch a
transformers class directly: they read a model's :class:`ModelSpec`, walk and
replace its linear layers by qualified name, and run the ragged forward pass
below. :class:`llmspeed.Model` implements this for Hugging Face causal LMs; a
tiny pure-torch model can implement it too, without inheriting anything.

Forward contract (what the generator needs)
-------------------------------------------
``forward_batch(input_ids, positions, attention, logits_indices)`` runs several
sequences packed into one flat token axis ("ragged batch"): ``input_ids[t]`` is
a token of some sequence at absolute position ``positions[t]``. The model does
not know which sequence a token belongs to; ``attention`` does. For every
attention layer the model calls ``attention(layer_idx, query, key, value,
scaling)`` with the new tokens' rotated queries/keys and values; the backend
stores keys/values in its (external, e.g. paged) KV cache and returns the
attention output. The model returns logits only at ``logits_indices`` (usually
the last token of each sequence), which saves the vocabulary projection for all
other tokens.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .quant.config import QuantConfig
    from .quant.layout import QuantLayout


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts about a decoder-only model that the modules need.

    Attributes:
        architecture: Name of the wrapped class, e.g. ``"LlamaForCausalLM"``.
        num_layers: Number of decoder layers (= attention layers = KV cache layers).
        num_heads: Query heads per attention layer.
        num_kv_heads: Key/value heads per layer (``< num_heads`` for grouped-query attention).
        head_dim: Channels per head.
        hidden_size: Width of the residual stream.
        vocab_size: Rows of the output projection.
        max_positions: Longest sequence the model's positions support.
        dtype: Dtype of the floating-point weights right now (changes with :func:`llmspeed.cast`).
        device: Device of the weights.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers at ``dtype``."""
        return self.kv_bytes_per_token_at(self.dtype)

    def kv_bytes_per_token_at(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers in a cache of ``dtype``."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


@runtime_checkable
class AttentionBackend(Protocol):
    """Attention over an external KV cache, called once per layer by ``forward_batch``."""

    def __call__(
        self,
        layer_idx: int,
        query: torch.Tensor,  # [1, num_heads, T, head_dim], rotary already applied
        key: torch.Tensor,  # [1, num_kv_heads, T, head_dim], rotary already applied
        value: torch.Tensor,  # [1, num_kv_heads, T, head_dim]
        scaling: float,
    ) -> torch.Tensor:  # [1, T, num_heads, head_dim]
        """Store ``key``/``value`` for the batch's tokens and return their attention output."""
        ...


@runtime_checkable
class QuantizedLinear(Protocol):
    """What a quantized linear module exposes so that other modules (LoRA, casting, memory, kernels) can handle it.

    Quantized modules hold packed integer buffers instead of a float ``weight``; ``dequantize``
    rebuilds the float weight and is the test oracle for every kernel. Kernels and the fused CPU
    decode step read the packed buffers through ``layout`` (group, groups, padded width) and never
    name a module class.
    """

    in_features: int
    out_features: int
    quant_format: str  # e.g. "int8", "int4", "nf4"
    config: QuantConfig
    layout: QuantLayout
    qweight: torch.Tensor  # int8 [out, in] or uint8 [out, in_pad / 2] (two 4-bit codes a byte)
    scales: torch.Tensor  # fp32 [out] (int8) or [out, groups]
    zeros: torch.Tensor  # fp32 [out, groups] (int4 only)
    perm: torch.Tensor  # int64 [in] (int4 with config.act_order only)

    @property
    def bias(self) -> torch.Tensor | None:  # [out] or None
        """The float bias added after the matmul."""
        ...

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:  # [r, in]
        """The float weight this module represents (``rows``: only those output rows)."""
        ...

    def packed_dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight in packed column order and basis (differs from ``dequantize`` only with act_order, whose
        columns are permuted, and hadamard, whose column groups are rotated: what the kernels multiply)."""
        ...

    def group_scales(self, rows: slice = slice(None)) -> torch.Tensor:  # [r, groups] fp32
        """Per-group scales, double-dequantized when stored that way (NF4)."""
        ...

    def kernel_state(self, name: str, build: Any) -> Any:
        """Tensors kernel ``name`` prepared from the packed buffers, built once per device and cached."""
        ...


def base_linear(module: nn.Module) -> nn.Module:
    """The innermost linear under wrappers that keep their wrapped layer in ``base_layer`` (LoRA)."""
    while hasattr(module, "base_layer"):
        module = cast(nn.Module, module.base_layer)
    return module


def is_quantized(module: nn.Module) -> bool:
    """True when ``module`` (or the layer it wraps) stores a quantized weight."""
    return isinstance(getattr(base_linear(module), "quant_format", None), str)


def is_fake_quantized(module: nn.Module) -> bool:
    """True when ``module`` (or the layer it wraps) is prepared for quantization-aware training: a
    ``FakeQuantLinear`` of :mod:`llmspeed.qat`, marked by its ``fake_format`` (it trains a float weight, so
    :func:`is_quantized` is False for it). Layers below ``qat`` ask this instead of importing it."""
    return isinstance(getattr(base_linear(module), "fake_format", None), str)



def training_modes(root: nn.Module) -> Callable[[], None]:
    """A function that puts every module of ``root`` back in the training mode it has now: ``root.train(flag)``
    sets them all alike, so a layer the caller had switched to eval inside a model in training would come back in
    training (its dropout on)."""
    modes = {m: m.training for m in root.modules()}

    def restore() -> None:
        for m, training in modes.items():
            m.training = training

    return restore

class FairRLock:
    """A re-entrant lock handed to its waiters first come, first served.

    ``threading.RLock`` lets the thread that releases it take it again at once: an engine thread stepping back to back
    kept it for as long as it had requests, and a ``lora`` verb waiting for it from another thread waited that long.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[object] = deque()  # tickets of the threads waiting, oldest first

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return True
            if not blocking and (self._owner is not None or self._queue):
                return False
            ticket = object()
            self._queue.append(ticket)
            got = False
            try:
                got = self._cv.wait_for(lambda: self._owner is None and self._queue[0] is ticket,
                                        None if timeout < 0 else timeout)  # fmt: skip
            finally:  # timed out, or interrupted (Ctrl-C): a ticket left queued would block every later acquire
                if not got:
                    self._queue.remove(ticket)
                    self._cv.notify_all()
            if not got:
                return False
            self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cv:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cv.notify_all()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_STEP_LOCKS: weakref.WeakKeyDictionary[nn.Module, FairRLock] = weakref.WeakKeyDictionary()
_STEP_LOCKS_GUARD = threading.Lock()


def step_lock(root: nn.Module) -> FairRLock:
    """The lock every step over the model rooted at ``root`` (its ``module``) holds while it runs.

    A step sets state on the model for its own duration: which adapter each token takes (LoRA routing), the
    attention implementation in the model's config. Two generators or engines on one model, stepping from their
    own threads, would otherwise run with each other's settings (another request's adapter, a config left
    switched). The ``llmspeed.lora`` verbs that change adapters (add, load, delete, set, merge, unmerge, train) take it
    too, as do ``cast``, ``quantize``, ``qat.prepare`` / ``convert`` and ``finetune``, so a step never meets them half done. Re-entrant, so a step may call ``forward_batch``, which takes it too; handed
    out first come, first served (:class:`FairRLock`); one per module, whichever wrapper reaches it, and dropped
    with the module.
    """
    with _STEP_LOCKS_GUARD:
        lock = _STEP_LOCKS.get(root)
        if lock is None:
            lock = _STEP_LOCKS[root] = FairRLock()
        return lock


def holds_step_lock(verb: Callable) -> Callable:
    """Run ``verb(model, ...)`` holding the model's :func:`step_lock` (``model``: a wrapper with a ``module``, or the
    module itself): a Generator or Engine stepping the model from another thread finishes its step first, and starts
    its next one on what ``verb`` changed, never on half of it (the ``llmspeed.lora`` verbs, training runs)."""

    @functools.wraps(verb)
    def locked(model, *args, **kwargs):
        root = getattr(model, "module", model)
        with step_lock(root) if isinstance(root, nn.Module) else nullcontext():
            return verb(model, *args, **kwargs)

    return locked


@runtime_checkable
class CausalLM(Protocol):
    """What llmspeed's modules need from a model. :class:`llmspeed.Model` implements it."""

    @property
    def spec(self) -> ModelSpec:
        """Shapes, dtype and device of the model as it is now."""
        ...

    @property
    def module(self) -> nn.Module:
        """The root ``nn.Module`` (to cast, save, train, count bytes)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer (or ``None`` for token-id-only models)."""
        ...

    def linear_names(self) -> list[str]:
        """Qualified names of every linear position (including the output head), in module order."""
        ...

    def linear_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(qualified name, module)`` for every linear position, whatever now sits there."""
        ...

    def replace_linear(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` at linear position ``name``; return the module it replaced."""
        ...

    def forward_batch(
        self,
        input_ids: torch.Tensor,  # [T] int64, a ragged batch flattened
        positions: torch.Tensor,  # [T] int64, absolute position of each token in its sequence
        attention: AttentionBackend,
        logits_indices: torch.Tensor,  # [N] int64, rows of the flat batch whose logits are wanted
    ) -> torch.Tensor:  # [N, vocab_size]
        """Run the ragged batch against the backend's KV cache; see the module docstring."""
        ...
