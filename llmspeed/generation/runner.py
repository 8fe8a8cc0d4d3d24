"""The model runner: owns the paged KV cache and runs one step's flat batch through the fastest path.

A step arrives as one :class:`StepInput` (token ids, positions, cache slots, chunks, logits rows,
adapters), built once by the generator; the runner picks how to run it:

* ``"cuda graph"``: decode-only steps on CUDA replay a captured graph (:mod:`.cuda_graphs`);
* ``"fused cpu"`` / ``"fused cpu mixed"``: decode-only steps of Llama-family models on the CPU run as one C++
  call (:mod:`.fused_decode`), and so do steps with prompt chunks where it is the faster path
  (:meth:`.fused_decode.FusedDecode.takes_prompt`);
* ``"decode"`` / ``"mixed"``: ``model.forward_batch`` with a :class:`~.kv_cache.PagedAttention`
  (SDPA over gathered blocks, or the Triton kernels of :mod:`.triton_attention` on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import huge_pages
from ..names import CANONICAL_DTYPES, dtype_name
from ..protocol import CausalLM, step_lock
from .block_manager import check_room, slot
from .kv_cache import PagedAttention, PagedKVCache, cache_dtype
from .readback import Readback
from .sampler import argmax_rows


@dataclass(frozen=True)
class StepInput:
    """One step's flat batch, single-token chunks first.

    Attributes:
        ids: Token ids, ``T`` of them.
        positions: Position of each token in its sequence.
        slots: Cache slot of each token (:func:`~.block_manager.slot`).
        chunks: ``(block_table, start, length)`` per sequence.
        rows: Flat-batch row of each sequence whose chunk ends where a token is sampled.
        adapters: LoRA adapter per sequence (``None``: the active one, ``False``: none), or ``None`` when no chunk
            has one.
        extra_rows: How many rows at the end of ``rows`` are not sampled but wanted for their logits (the prompt
            positions of requests that asked for ``prompt_logprobs``); such a step runs on the generic path.
    """

    ids: list[int]
    positions: list[int]
    slots: list[int]
    chunks: list[tuple[Sequence[int], int, int]]
    rows: list[int]
    adapters: list[str | Literal[False] | None] | None = None
    extra_rows: int = 0

    @classmethod
    def build(cls, chunks: Sequence[tuple[Sequence[int], int, int, Sequence[int], bool, str | Literal[False] | None]],
              block_size: int) -> StepInput:
        """From ``(block_table, start, length, tokens, samples, adapter)`` per sequence."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        for table, start, length, tokens, samples, _ in chunks:
            ids += tokens
            positions += range(start, start + length)
            slots += [slot(table, p, block_size) for p in range(start, start + length)]
            if samples:
                rows.append(len(ids) - 1)
        adapters = [a for *_, a in chunks] if any(a is not None for *_, a in chunks) else None
        return cls(ids, positions, slots, [(t, s, n) for t, s, n, *_ in chunks], rows, adapters)

    @classmethod
    def decode(cls, rows: Sequence[tuple[Sequence[int], int, int]], block_size: int) -> StepInput:
        """A decode-only step from ``(block_table, position, token)`` per sequence."""
        return cls.build([(t, pos, 1, [tok], True, None) for t, pos, tok in rows], block_size)

    @property
    def decode_only(self) -> bool:
        """Every chunk is one token and is sampled."""
        return not self.extra_rows and len(self.ids) == len(self.rows) == len(self.chunks)


class ModelRunner:
    """Runs steps of one model over one paged KV cache (see the module docstring for the paths).

    Args:
        model: The model.
        num_blocks: KV blocks the scheduler hands out.
        block_size: Tokens per block.
        max_seqs: Most sequences in a step (sizes the CUDA graphs).
        cuda_graphs, fused_decode, lora_dtype, attention: As in :class:`~llmspeed.generation.Generator`.
        kv_cache_dtype: As in :class:`~llmspeed.generation.Generator` (``"auto"``: the model's dtype).
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_seqs: int, *,
                 cuda_graphs: bool = True, fused_decode: bool | None = None, lora_dtype: str | torch.dtype = "fp16",
                 attention: str = "auto", kv_cache_dtype: str | torch.dtype = "auto"):  # fmt: skip
        lora_name = dtype_name(lora_dtype)
        if lora_name not in ("fp16", "fp32"):
            raise ValueError(f"lora_dtype must be fp16 or fp32 (or another spelling: 'float16', 'half', "
                             f"torch.float32, ...); got {lora_dtype!r}")  # fmt: skip
        spec = model.spec
        self.model = model
        self.device = spec.device
        self.weight_pages = self._setup_pages(model)
        use_graphs = cuda_graphs and self.device.type == "cuda"
        # one extra block, never allocated, is the scratch space of padded CUDA-graph rows
        self.cache = PagedKVCache(spec, num_blocks + use_graphs, block_size, cache_dtype(spec, kv_cache_dtype))
        # "auto": the cache follows the model's dtype (follow_model_dtype)
        self.auto_dtype = isinstance(kv_cache_dtype, str) and kv_cache_dtype.strip().lower() == "auto"
        self.attention = attention
        self.per_layer_attention = self._setup_attention(spec, attention)  # the kernels of per-layer steps
        self.graphs: Any = None
        if use_graphs:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                model, self.cache, pad_block=num_blocks, max_batch=min(max_seqs, 256), decode_kernel=self.decode_kernel
            )
        self.fused: Any = None  # a FusedDecode when decode steps take the fused CPU path
        self.burst_paths: list[str] = []  # the path of each step of the last burst_steps that ran (as run() names it)
        self._fused_status = self._setup_fused(model, fused_decode, CANONICAL_DTYPES[str(lora_name)])

    @property
    def fused_decode_status(self) -> str:
        """``"on"``, or why decode steps take the generic path: from the start, or for now, while the model has
        changed into one the fused step cannot run (an adapter added to the output head, ...)."""
        if self.fused is None:
            return self._fused_status
        from .fused_decode import unsupported

        reason = unsupported(self.model)
        return "on" if reason is None else f"off ({reason})"

    @property
    def attention_status(self) -> str:
        """Which attention kernels steps use: the per-layer path's, and the fused CPU step's where it runs."""
        if self.fused is None:
            return self.per_layer_attention
        return f"{self.per_layer_attention}; fused cpu steps: C++ paged attention for {self.fused.rows_taken()}"

    def _setup_attention(self, spec: Any, wanted: str) -> str:
        self.decode_kernel: Any = None
        self.prefill_kernel: Any = None
        self.fresh_kernel: Any = None  # steps whose prompt chunks all start their sequences, in the model's dtype:
        self.fresh_dtype: torch.dtype | None = None  # the dtype it was checked for
        if wanted not in ("auto", "sdpa", "triton"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'triton'; got {wanted!r}")
        if wanted == "auto" and self.device.type == "cpu":
            from . import fused_decode

            if fused_decode.unavailable() is None:
                self.decode_kernel = fused_decode.paged_decode
                return "C++ paged decode, sdpa prefill"
            return f"sdpa (the C++ decode kernel is unavailable: {fused_decode.unavailable()})"
        if wanted == "sdpa" or (wanted == "auto" and self.device.type != "cuda"):
            return "sdpa"
        from . import triton_attention

        fresh = self._setup_fresh(spec) if wanted == "auto" else ""
        why = triton_attention.probe(self.device, spec.dtype, spec.num_kv_heads, spec.num_heads, spec.head_dim)
        if why is None:
            self.decode_kernel = triton_attention.paged_decode
            if wanted == "auto":  # SDPA's prefill is the faster of the two on an H100 (docs/gpu.md)
                return "triton decode, sdpa prefill" + fresh
            self.prefill_kernel = triton_attention.TRITON_PREFILL
            return "triton"
        if wanted == "triton":
            raise ValueError(f"attention='triton' cannot run here: {why}")
        return f"sdpa ({why})" + fresh

    def _setup_fresh(self, spec: Any) -> str:
        """FlashAttention's varlen kernel for steps whose prompt chunks all start their sequences (on CUDA, where it
        runs and agrees with SDPA: :func:`.varlen_attention.probe`); what the attention status adds for it."""
        from . import varlen_attention

        why = varlen_attention.probe(self.device, spec.dtype, spec.num_kv_heads, spec.num_heads, spec.head_dim)
        if why is not None:
            return f"; new prompts: sdpa ({why})"
        self.fresh_kernel, self.fresh_dtype = varlen_attention.fresh_prefill, spec.dtype
        return "; new prompts: flash varlen"

    def _setup_pages(self, model: CausalLM) -> str:
        """On the CPU, the model's weights moved into 2 MiB pages (:func:`llmspeed.huge_pages.move`); what of them
        is there."""
        if self.device.type != "cpu":
            return f"{self.device.type} memory"
        why = huge_pages.why_not()
        if why is not None:
            return f"4 KiB pages ({why})"
        start = time.perf_counter()
        with step_lock(model.module):  # as cast and quantize: no step of another generator meets the move half done
            moved = huge_pages.move(model.module)
        took = f" ({moved / 1e6:.0f} MB moved now, in {time.perf_counter() - start:.1f} s)" if moved else ""
        held = huge_pages.held(model.module)
        return f"2 MiB pages: {held / 1e6:.0f} MB of weights{took}" if held else "4 KiB pages (less than 2 MiB to move)"

    def _setup_fused(self, model: CausalLM, wanted: bool | None, lora_dtype: torch.dtype) -> str:
        if not (wanted is None or isinstance(wanted, bool)):  # 1 == True: `in (None, True, False)` took 1 and 0.0
            raise ValueError(f"fused_decode must be None, True or False; got {wanted!r}")
        if wanted is False:
            return "off (fused_decode=False)"
        from . import fused_decode

        reason = fused_decode.unsupported(model)
        if reason is None and fused_decode.unavailable() is not None:
            reason = f"the C++ decode kernel is unavailable: {fused_decode.unavailable()}"
        if reason is not None:
            if wanted:
                raise ValueError(f"fused_decode=True, but this model cannot use it: {reason}")
            return f"off ({reason})"
        self.fused = fused_decode.FusedDecode(model, self.cache, lora_dtype=lora_dtype)
        return "on"

    def warmup(self, max_seqs: int, context: int = 512) -> int:
        """Capture the CUDA graphs of decode steps for every batch size up to ``max_seqs``; return how many are held."""
        if self.graphs is None:
            return 0
        from .cuda_graphs import bucket

        rows = 1
        while rows <= bucket(min(max_seqs, self.graphs.max_batch)) and self.graphs.capture(rows, context):
            rows *= 2
        return self.graphs.num_graphs

    def run(self, step: StepInput) -> tuple[str, torch.Tensor]:
        """Run one step; return the path it took and the logits ``[len(step.rows), V]``.

        The step holds the model's :func:`~llmspeed.protocol.step_lock`, so runners of two generators (or
        engines) on one model take turns instead of running with each other's adapter routing.
        """
        with step_lock(self.model.module):
            self.follow_model_dtype()
            return self._run(step)

    def follow_model_dtype(self) -> None:
        """After the model's dtype changed (:func:`llmspeed.cast`, ``.to``): set the fused step's bf16 widening for it
        and, with ``kv_cache_dtype="auto"``, convert the cache to it (running requests' keys and values rounded to it),
        as a fresh generator's cache would be, and set up again what was chosen for the old cache dtype: the attention
        kernels and the CUDA graphs (captured on the old cache tensors)."""
        spec = self.model.spec
        if spec.device != self.cache.key.device:  # its cache, graphs and kernels were made for the old device
            raise RuntimeError(f"the model moved to {spec.device} after this generator was made (its KV cache is on "
                               f"{self.cache.key.device}): make a new Generator (or Engine) for it there")  # fmt: skip
        dtype = spec.dtype
        if self.fused is not None and self.fused.dtype != dtype:  # whatever the cache's dtype (regression: only "auto")
            self.fused.follow_dtype()
        if not self.auto_dtype or dtype == self.cache.key.dtype:
            return
        self.cache.key, self.cache.value = self.cache.key.to(dtype), self.cache.value.to(dtype)
        self.per_layer_attention = self._setup_attention(self.model.spec, self.attention)
        if self.graphs is not None:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.cache, pad_block=self.graphs.pad_block,
                                       max_batch=self.graphs.max_batch, decode_kernel=self.decode_kernel)  # fmt: skip

    def burst_ready(self, n: int, adapters: list[str | Literal[False] | None] | None, random: bool,
                    fused: bool = True) -> bool:  # fmt: skip
        """Whether :meth:`burst_steps` would run a burst of ``n`` rows (``random``: some sample at random), asked
        before the blocks of its tokens are taken: taking them can evict prefix-cache blocks a declined burst would
        not give back."""
        if self.fused is not None and fused:
            with step_lock(self.model.module):
                return not random and self.fused.burst_ready(n, adapters)
        return n > 0

    def burst_steps(self, rows: Sequence[tuple[Sequence[int], int, int]], steps: int,
                    adapters: list[str | Literal[False] | None] | None,
                    sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    fused: bool = True) -> Iterator[tuple[list[int], float]] | None:  # fmt: skip
        """``steps`` decode steps of the rows ``(block_table, position, token)`` back to back, each row's token of a
        step the next step's input: per step, its tokens (one per row) and the ``time.perf_counter()`` at which they
        were known, or ``None`` where the steps cannot run that way (then the caller goes on one step at a time).
        ``sample`` maps a step's logits ``[n, V]`` to its tokens ``[n]`` on the device (:func:`~.sampler.sample_ids`);
        ``None``: each row's argmax. Holds the model's :func:`~llmspeed.protocol.step_lock` as :meth:`run` does.

        With the fused CPU step, where ``fused`` (the step before ran on it), greedy only, one C++ call
        (:meth:`.fused_decode.FusedDecode.greedy_steps`). Otherwise (a batch the fused step leaves to the generic
        path, e.g. more rows than its ``max_rows``, has its burst there too) each step runs as :meth:`run` would (a
        CUDA graph replay where one is captured, else ``forward_batch``), its input ids the previous step's tokens
        on the device: on a GPU the host queues every step without waiting for any, and each step's tokens come
        back behind it (:class:`~.readback.Readback`), so the caller turns the first steps' tokens into events
        while the GPU runs the later ones. The tokens are those the sampler gives one step at a time
        (:func:`~.sampler.argmax_rows` of the fp32 logits for greedy rows, each random row's own generator drawn
        once a step). The block tables must already hold ``position + steps`` tokens. Once it returns the steps,
        :attr:`burst_paths` holds each one's path (``"fused cpu"``; elsewhere ``"cuda graph"``, or ``"decode"`` for a
        step no graph ran: a capture that failed part way).
        """
        bs = self.cache.block_size
        check_room(rows, steps, bs)
        with step_lock(self.model.module):
            if self.fused is not None and fused:  # its C++ loop takes argmaxes only
                burst = None if sample is not None else self.fused.greedy_steps(rows, steps, adapters)
                self.burst_paths = ["fused cpu"] * steps
                return None if burst is None else zip(*burst)
            if steps < 1 or not rows:
                return None
            ids = torch.tensor([t for _, _, t in rows], dtype=torch.long, device=self.device)  # [n]
            pending: list[Readback] = []
            self.burst_paths = []
            for j in range(steps):
                step = StepInput.build([(t, p + j, 1, [0], True, a)
                                        for (t, p, _), a in zip(rows, adapters or [None] * len(rows))], bs)
                path, logits = self._run(step, ids)  # [n, V]
                self.burst_paths.append(path)
                # on a GPU, queued after the step; nothing waits here
                ids = (argmax_rows(logits.float()) if sample is None else sample(logits)).to(self.device)  # [n]
                pending.append(Readback(ids))
            return (r.get() for r in pending)

    def _run(self, step: StepInput, ids: torch.Tensor | None = None) -> tuple[str, torch.Tensor]:
        """``ids`` (``[T]`` on the model's device): the step's token ids where they are not yet on the host
        (:meth:`burst_steps`); they replace ``step.ids``, and the fused CPU step, which reads host ids, is not
        tried."""
        plain = step.decode_only and step.adapters is None
        if self.graphs is not None and plain:
            logits = self.graphs.run(step, ids)
            if logits is not None:
                return "cuda graph", logits
        if self.fused is not None and ids is None and not step.extra_rows:  # its rows are the sampled ones
            logits = self.fused.run(step, step.adapters)  # rows without one: the active adapter
            if logits is not None:
                return ("fused cpu" if step.decode_only else "fused cpu mixed"), logits
        fresh = self.fresh_kernel if self.fresh_dtype == self.model.spec.dtype else None  # checked for this dtype
        attention = PagedAttention(self.cache, step.chunks, self.decode_kernel, self.prefill_kernel, slots=step.slots,
                                   fresh_kernel=fresh)  # fmt: skip
        dev = self.device
        with torch.inference_mode(), self._adapters(step):
            logits = self.model.forward_batch(
                torch.tensor(step.ids, dtype=torch.long, device=dev) if ids is None else ids,  # [T]
                torch.tensor(step.positions, dtype=torch.long, device=dev),  # [T]
                attention,
                torch.tensor(step.rows, dtype=torch.long, device=dev),  # [N]
            )  # [N, V]
        return ("decode" if step.decode_only else "mixed"), logits

    def _adapters(self, step: StepInput):
        if step.adapters is None:
            return nullcontext()
        from ..lora import per_token_adapters
        from ..lora.inject import adapter_identity

        # requests without an adapter run the model as it is set: its active adapter, none inside lora.disabled()
        identity = adapter_identity(self.model, None)
        default = identity[0] if identity is not None else None
        names: list[str | None] = []
        for (_, _, length), name in zip(step.chunks, step.adapters):
            names += [default if name is None else name or None] * length  # False: the base alone
        rows = torch.tensor(step.rows, dtype=torch.long, device=self.device)  # [N]: what a LoRA output head sees
        return per_token_adapters(self.model, names, logits_indices=rows)
