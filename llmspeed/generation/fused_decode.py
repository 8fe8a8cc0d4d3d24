"""A fused CPU decode step for Llama-family models: one C++ call per step instead of ~2000 op dispatches.

At batch 1 a decode step of a small model is two things: reading every weight once, and dispatching
about 65 small torch ops per layer; on a 2-core CPU the second dominates the eager step of
SmolLM2-135M (docs/batching.md has the measurements). :class:`FusedDecode` runs decode-only steps (every sequence adds one token) of
a supported model through ``decode_cpu.cpp``: every layer, the paged-KV write and attention, the
final norm and the output projection in one call, with GEMVs that stream the weights at memory
speed. The model's own modules provide the weights (no copy), the embedding and the rotary tables,
so what runs is the model as it is at that step. It also runs steps with prompt chunks
(:attr:`FusedDecode.mixed`): each token is a row that attends over its sequence's cache up to its own
position, the matrices run as tile matmuls where the CPU has AMX, else from :func:`gemm_rows` rows as
torch's GEMM (bf16 widened to fp32 where the native bf16 GEMM is slow), and only the sampled rows reach
the output head; quantized matrices of prompt-sized steps run as the per-layer path runs them.
:meth:`FusedDecode.greedy_steps` runs several greedy decode steps in one call (``Generator``'s
``num_scheduler_steps``).

Supported (checked at every step, else the generic path runs): ``model_type`` ``llama``,
``mistral``, ``qwen2``, ``qwen3`` (per-head q/k RMSNorm) or ``phi3`` (fused ``qkv_proj`` and ``gate_up_proj``, read as
row ranges: :mod:`.layer_matrices`; a rotary embedding over the whole head or its first dimensions, as
Phi-4-mini's ``partial_rotary_factor``) with SiLU MLPs and RMSNorm, on CPU, whose
projections are plain
``nn.Linear`` in fp32 or bf16 or llmspeed's weight-only int8, int4 and NF4 linears (4-bit groups a
multiple of 16; q/k/v biases allowed), optionally wrapped with unmerged LoRA adapters (each row of
the batch with its own adapter: :mod:`.fused_lora`; over Phi-3's fused projections when each matrix's rows are
whole blocks of 16 outputs). Other architectures and
devices, a LoRA-wrapped ``lm_head``, merged adapters and adapters with dropout in training mode use the generic path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..machine import isa_flags
from ..precision import cpu_matmul
from . import fused_lora
from .block_manager import check_room
from .fused_build import amx_available, extension, float_prefetch, gemm_rows, int8_dot_available, unavailable
from .fused_snapshot import ARCHITECTURES, Snapshot, embedding_dtype, embedding_parts, unsupported
from .kv_cache import PagedKVCache, block_tables
from .rope_table import RopeTable, static

if TYPE_CHECKING:
    from .runner import StepInput

__all__ = [  # with what fused_build and fused_snapshot give the step: what and where it runs, the extension
    "AMX_ROWS", "ARCHITECTURES", "AVX512_MAX_ROWS", "FusedDecode", "amx_available", "default_max_rows", "extension",
    "float_prefetch", "gemm_rows", "int8_dot_available", "paged_decode", "unavailable", "unsupported",
]  # fmt: skip

def paged_decode(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> torch.Tensor:  # fmt: skip
    """The generic path's decode attention on the CPU, read in place from the paged cache (a ``DecodeKernel``).

    ``q [n, H, D]``, ``key``/``value [NB, BS, Hkv, D]`` (fp32, bf16 or fp16), ``tables [n, W]``, ``lens [n]`` ->
    ``[n, H, D]`` in ``q``'s dtype: the fused step's own attention loop, so no block is gathered or copied
    (gather + SDPA spent about as long copying the blocks as attending over them).
    """
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the C++ decode kernel is unavailable: {unavailable()}")
    out = ext.paged_decode(q.float().contiguous(), key, value, tables.contiguous(), lens.contiguous(), scale)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def default_max_rows(amx: bool | None = None) -> int:
    """Most decode rows a fused step takes on this CPU: no limit, or :data:`AVX512_MAX_ROWS` on AVX-512 CPUs without AMX.

    The fused step's row-loop GEMVs cost grows with every row; the generic path's GEMMs share each
    weight read across rows. On 2-core AVX2 CPUs (Zen 1, Zen 3) the fused step was faster at every row
    count up to 64; on a 2-core AVX-512 Ice Lake Xeon without AMX it was faster up to 32 rows in every
    format (0.44-0.82x the generic path's step at 16-32 rows) and from about 48 rows the generic path's
    MKL GEMMs caught up in fp32. With AMX tiles usable (:data:`AMX_ROWS`) the fused step beat the generic
    path at every row count measured. docs/batching.md has the measurements. ``amx``: whether the tiles
    are usable (default: ask the built extension, :func:`amx_available`).
    """
    if "avx512f" not in isa_flags():
        return 1 << 30
    return 1 << 30 if (amx_available() if amx is None else amx) else AVX512_MAX_ROWS


AVX512_MAX_ROWS = 32
""":func:`default_max_rows` on AVX-512 CPUs without AMX: decode steps of more rows take the generic path."""


_EMPTY_ROWS = torch.empty(0, dtype=torch.long)  # decode_step's logit_rows for "every row"

AMX_ROWS = 8
"""Default of :attr:`FusedDecode.amx_rows`: from 8 rows the fused step runs int8, 4-bit and bf16 matrices on
AMX tiles, fp32 matrices (three tile products and a split per call) from twice as many."""


class FusedDecode:
    """Decode-only steps of a supported model, and where :attr:`mixed` steps with prompt chunks, through the
    fused C++ step.

    Args:
        model: An :class:`llmspeed.Model` (checked with :func:`unsupported` whenever its modules change).
        cache: The generator's paged KV cache.
        max_rows: Steps with more rows than this return ``None`` (the generic path runs them); default
            :func:`default_max_rows`.
        amx_rows: Steps with at least this many rows run their matrices on AMX tiles where the CPU has
            them (0: never; fp32 matrices from twice as many).
        lora_dtype: ``torch.float16`` (default) or ``torch.float32``: the precision of the LoRA stacks
            the step reads (:mod:`.fused_lora`).
        mixed: Whether steps with prompt chunks run here too. Default (``None``): every one where the CPU
            has AMX tiles (:func:`amx_available`), which make a prompt's matrices tile matmuls; without them,
            the steps :meth:`takes_prompt` says.
    """

    def __init__(self, model, cache: PagedKVCache, max_rows: int | None = None, amx_rows: int = AMX_ROWS,
                 lora_dtype: torch.dtype = torch.float16, mixed: bool | None = None):  # fmt: skip
        if lora_dtype not in fused_lora.LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {list(fused_lora.LORA_DTYPES)}; got {lora_dtype!r}")
        if mixed not in (None, True, False):
            raise ValueError(f"mixed must be None, True or False; got {mixed!r}")
        self.lora_dtype = lora_dtype
        self.model = model
        self.cache = cache
        self.ext: Any = extension()
        # measured once per machine and width (then read back); set again before each step of this model
        self.prefetch = float_prefetch(model.spec.hidden_size) if self.ext is not None else True
        self.max_rows = default_max_rows() if max_rows is None else max_rows
        self.amx_rows = amx_rows
        self.mixed = mixed
        self.amx = amx_available()
        # bf16 matrices of prompt-sized steps: widened to fp32 where the native bf16 GEMM is slow (no crossover:
        # it is fast); asked only of bf16 models (the first time costs a 0.1 s measurement)
        self.upcast_bf16 = False
        self.follow_dtype()
        self._snapshot: Snapshot | None = None
        self._rope: RopeTable | None = None

    def forget(self) -> None:
        """Drop the snapshot (its fp32 copies and LoRA stacks) and the rotary table: the next step reads the model
        again (:meth:`~llmspeed.generation.Generator.weights_changed`)."""
        self._snapshot = None
        self._rope = None

    def follow_dtype(self) -> None:
        """Set :attr:`upcast_bf16` for the model's dtype as it is now (after :func:`llmspeed.cast` changed it), and
        :attr:`dtype` to that dtype."""
        self.dtype = self.model.spec.dtype
        self.upcast_bf16 = self.dtype == torch.bfloat16 and cpu_matmul.crossover(torch.bfloat16) is not None

    def _rotary(self, rotary: nn.Module, positions: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin rows ``[n, D]`` of ``positions``: from a table where ``rotary`` allows one, else computed."""
        if static(rotary):
            return self._rope_table(rotary).lookup(positions, emb.dtype)
        cos, sin = rotary(emb[None], positions[None])  # [1, n, D] each
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def _rope_table(self, rotary: nn.Module) -> RopeTable:
        """The rotary table of ``rotary`` (a :func:`~.rope_table.static` module), kept while the model keeps it."""
        if self._rope is None or self._rope.rotary is not rotary:
            self._rope = RopeTable(rotary)
        return self._rope

    def takes_prompt(self, rows: int) -> bool:
        """Whether a step with prompt chunks and ``rows`` rows runs here.

        ``mixed`` decides when set. By default every such step runs here where the CPU has AMX tiles;
        elsewhere the steps of up to :attr:`max_rows` rows (the row loop's limit, as for decode steps) and
        those of at least :func:`gemm_rows` rows, whose matrices run as the per-layer path runs them (torch's
        GEMM over fp32, widened bf16 or dequantized blocks; int4 with int8 activations in byte-product
        panels) without the Python between layers. On the 2-core Zen 3 (AVX2, no AMX) the fused step took
        0.26-0.92x the per-layer path's time for every format from 8 to 496 rows (docs/batching.md).
        """
        if self.mixed is not None:
            return self.mixed
        return self.amx or rows <= self.max_rows or rows >= gemm_rows()

    def rows_taken(self) -> str:
        """Which rows the fused step takes, in words (:meth:`takes_prompt`'s rule, for status lines)."""
        if self.mixed is False:
            return "decode rows"
        if self.mixed or self.amx or self.max_rows + 1 >= gemm_rows():
            return "decode rows and prompt chunks"
        return f"decode rows, and prompt chunks in steps of up to {self.max_rows} or from {gemm_rows()} rows"

    def _current(self, adapters: list[str | Literal[False] | None] | None, n: int) -> tuple[Snapshot, list[str | None]] | None:
        """A valid snapshot and each of the ``n`` rows' adapter (:meth:`_names`), or ``None`` when the fused step
        cannot run the model or those adapters."""
        snap = self._snapshot
        if snap is not None:
            names = self._names(snap, adapters, n)
            if snap.valid(names):
                return None if names is None else (snap, names)
        self._snapshot = None
        if self.ext is None or unsupported(self.model) is not None:
            return None
        snap = self._snapshot = Snapshot(self.model.hf, self.ext, self.lora_dtype)
        names = self._names(snap, adapters, n)
        return None if names is None else (snap, names)

    def run(self, step: StepInput, adapters: list[str | Literal[False] | None] | None = None) -> torch.Tensor | None:  # [r, vocab]
        """Logits of the sampled rows (``step.rows``) of a :class:`~.runner.StepInput`, or ``None`` when the
        generic path must run it: the model is unsupported, a decode-only step has more than :attr:`max_rows`
        rows, or the step has prompt chunks and does not run here (:meth:`takes_prompt`).

        ``adapters``: each sequence's LoRA adapter name; a sequence without one (``None``, or ``adapters=None``
        for all) runs the model's active adapter (:func:`llmspeed.lora.set_adapter`), as the generic path does, and
        one given ``False`` the base model alone.
        """
        decode = step.decode_only
        if (decode and len(step.ids) > self.max_rows) or (not decode and not self.takes_prompt(len(step.ids))):
            return None
        current = self._current(adapters, len(step.chunks))
        if current is None:
            return None
        snap, names = current
        bs = self.cache.block_size
        width = -(-(max(step.positions) + 1) // bs)
        tables = block_tables([t for t, _, _ in step.chunks], width, torch.device("cpu"))  # [chunks, W]
        slot_names = names
        if not decode:  # one row per token: each row reads its chunk's block table
            lengths = torch.tensor([n for _, _, n in step.chunks])  # [chunks]
            tables = tables.repeat_interleave(lengths, dim=0)  # [n, W]
            slot_names = [name for name, (_, _, n) in zip(names, step.chunks) for _ in range(n)]
        body = self.model.hf.model
        positions = torch.tensor(step.positions)  # [n]
        ids = torch.tensor(step.ids)  # [n]
        slots = torch.tensor(step.slots)  # [n]
        # an empty logit_rows asks for every row: a step that samples none (a long prompt's chunk) asks for one
        rows = _EMPTY_ROWS if decode else torch.tensor(step.rows or [len(step.ids) - 1], dtype=torch.long)  # [r]
        with torch.inference_mode():
            emb = body.embed_tokens(ids)  # [n, E]
            cos, sin = self._rotary(body.rotary_emb, positions, emb)  # [n, D] each, fp32
            self.ext.float_prefetch(self.prefetch)
            self.ext.upcast_bf16(self.upcast_bf16)
            logits = self.ext.decode_step(
                emb.float().contiguous(),
                snap.handle,
                self.cache.key, self.cache.value,
                slots, tables, positions + 1,
                cos, sin,
                snap.norm,
                snap.num_heads, snap.eps, snap.scaling,
                snap.adapter_slots(slot_names),
                self.amx_rows,
                snap.flags,
                rows,  # the sampled rows' logits only
            )  # fmt: skip  # [r, vocab]
        return logits if decode or step.rows else logits[:0]

    def greedy_steps(self, rows: Sequence[tuple[Sequence[int], int, int]], steps: int,
                     adapters: list[str | Literal[False] | None] | None = None) -> tuple[list[list[int]], list[float]] | None:  # fmt: skip
        """``steps`` decode steps of the rows ``(block_table, position, token)`` back to back in one C++ call, each
        row's argmax token the next step's input: the tokens (``[steps][rows]``) and the ``time.perf_counter()``
        at which each step's tokens were known, or ``None`` where :meth:`run` would give ``None`` for a decode step
        of these rows, or the input embedding or the rotary module is one the C++ loop cannot read
        (:func:`embedding_parts`, :func:`~.rope_table.static`).

        What a greedy row samples is :func:`~.sampler.argmax_rows` of its logits, and the C++ loop takes the
        same argmax of the same logits, so the tokens are those that ``steps`` calls of :meth:`run`, each
        followed by sampling, would give. Between steps nothing runs in Python: once a step has streamed the
        weights through the cache, each small torch op of the next step's inputs costs several times its
        warm time (docs/kernels.md has the measurements).
        The block tables must already hold ``position + steps`` tokens. ``adapters`` as in :meth:`run`.
        """
        bs = self.cache.block_size
        check_room(rows, steps, bs)  # else the padding block would take their keys and values: another sequence's cache
        ready = self._burst_parts(len(rows), adapters) if steps >= 1 else None
        if ready is None:
            return None
        (snap, names), embedding, dtype = ready
        body = self.model.hf.model
        last = max(p for _, p, _ in rows) + steps  # positions 0..last-1 are read
        cos, sin = self._rope_table(body.rotary_emb).tables(last, dtype)  # [P, D] each
        tables = block_tables([t for t, _, _ in rows], -(-last // bs), torch.device("cpu"))  # [n, W]
        start = time.perf_counter()
        with torch.inference_mode():
            self.ext.float_prefetch(self.prefetch)
            self.ext.upcast_bf16(self.upcast_bf16)
            tokens, known = self.ext.greedy_steps(
                torch.tensor([t for _, _, t in rows]), snap.handle,
                self.cache.key, self.cache.value,
                tables, torch.tensor([p for _, p, _ in rows]),
                cos, sin,
                *embedding,
                snap.norm,
                snap.num_heads, snap.eps, snap.scaling,
                snap.adapter_slots(names),
                self.amx_rows,
                snap.flags,
                steps,
            )  # fmt: skip  # [steps, n] int64, [steps] seconds since start
        return tokens.tolist(), [start + t for t in known.tolist()]

    def burst_ready(self, n: int, adapters: list[str | Literal[False] | None] | None = None) -> bool:
        """Whether :meth:`greedy_steps` would run ``n`` rows with ``adapters`` (asked before their blocks are taken)."""
        return self._burst_parts(n, adapters) is not None

    def _burst_parts(self, n: int, adapters: list[str | Literal[False] | None] | None) -> tuple[Any, Any, Any] | None:
        """The snapshot with the rows' adapter names, the embedding's parts and its dtype for a burst of ``n`` rows, or
        ``None`` where the C++ loop cannot run it."""
        if n > self.max_rows:
            return None
        current = self._current(adapters, n)
        body = self.model.hf.model
        embedding = embedding_parts(body.embed_tokens)
        dtype = embedding_dtype(body.embed_tokens)  # known wherever embedding_parts reads the embedding
        if current is None or embedding is None or dtype is None or not static(body.rotary_emb):
            return None
        return current, embedding, dtype

    def _names(self, snap: Snapshot, adapters: list[str | Literal[False] | None] | None, n: int) -> list[str | None] | None:
        """Each sequence's adapter (given ``None``: the model's active one; ``False``: none), or ``None`` when the step
        cannot run them."""
        names = [snap.active if a is None else a or None for a in (adapters or [None] * n)]
        if not snap.one_active or not set(names) <= {None, *snap.slots}:
            return None  # layers set to different adapters, or an adapter the snapshot lacks: the generic path
        return names
