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
``mistral``, ``qwen2`` or ``qwen3`` (per-head q/k RMSNorm) with SiLU MLPs and RMSNorm, on CPU, whose projections are plain
``nn.Linear`` in fp32 or bf16 or llmspeed's weight-only int8, int4 and NF4 linears (4-bit groups a
multiple of 16; q/k/v biases allowed), optionally wrapped with unmerged LoRA adapters (each row of
the batch with its own adapter: :mod:`.fused_lora`). Other architectures and devices, a LoRA-wrapped
``lm_head``, merged adapters and adapters with dropout in training mode use the generic path.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import cpp_build
from ..machine import isa_flags
from ..precision import cpu_matmul
from . import fused_lora
from .kv_cache import PagedKVCache, block_tables
from .rope_table import RopeTable, static

if TYPE_CHECKING:
    from .runner import StepInput

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
Q4_HEADER = Path(__file__).parent.parent / "quant" / "kernels" / "q4_tiles.h"  # the shared 4-bit tiles
AMX_HEADER = Q4_HEADER.with_name("amx_tiles.h")  # the shared AMX tile matmul
INT8_HEADER = Q4_HEADER.with_name("q4_int8.h")  # int8 activations and the int4 / int8 x int8 dot products (VNNI, AVX2)
PANELS_HEADER = Q4_HEADER.with_name("q4_panels.h")  # int4 x int8 activations for prompt-sized steps (AVX2, VNNI)
Q8_PANELS_HEADER = Q4_HEADER.with_name("q8_panels.h")  # int8 x int8 activations for prompt-sized steps (VNNI)
DEQUANT_HEADER = Q4_HEADER.with_name("dequant_rows.h")  # packed rows widened to fp32 for prompt-sized GEMMs
VEC_HEADER = SOURCE.with_name("cpu_vec.h")  # widening loads to fp32 registers
ATTENTION_HEADER = SOURCE.with_name("paged_attention.h")  # decode attention over the paged KV cache
TEAM_HEADER = SOURCE.with_name("step_team.h")  # the threads held for one decode step
STEP_HEADERS = [SOURCE.with_name(name) for name in  # the step's own parts (decode_cpu.cpp says which is which)
                ("gemv_rows.h", "gemv_group.h", "step_ops.h", "lora_deltas.h", "held_weights.h")]
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ASSIGNED = [0]  # child modules assigned anywhere in this process since the hook below was installed


def _count_assignment(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    _ASSIGNED[0] += 1


@lru_cache(maxsize=1)
def _watch_assignments() -> None:
    """Count every child module assignment in the process (``setattr``, ``add_module``, ``ModuleList[i] =``):
    a global torch hook, installed once, that :meth:`_Snapshot.valid` reads."""
    nn.modules.module.register_module_module_registration_hook(_count_assignment)


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    functions = ["decode_step", "hold", "release", "held_current", "gemv", "paged_decode", "amx_usable", "vnni_usable",
                 "float_prefetch", "upcast_bf16", "gemm_rows", "step_team", "greedy_steps"]
    headers = [Q4_HEADER, AMX_HEADER, INT8_HEADER, PANELS_HEADER, Q8_PANELS_HEADER, DEQUANT_HEADER, VEC_HEADER, ATTENTION_HEADER, TEAM_HEADER,
               *STEP_HEADERS]  # fmt: skip
    return cpp_build.build("llmspeed_decode_cpu", SOURCE, functions, includes=headers)


def extension() -> ModuleType | None:
    """The compiled decode extension (built on first call), or ``None`` when it cannot be built."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the C++ decode kernel cannot run here, or ``None`` (builds it on first call)."""
    return _build()[1]


PREFETCH_KEY = "cpu|fused step|float weight prefetch|k{k}"  # its entry in the kernel choices of this machine
PREFETCH_PROBE_MB = 96  # fp32 weight the measurement streams: more than the last-level cache of the CPUs measured


def float_prefetch(k: int = 1024) -> bool:
    """Whether the fused step's float row loop (fp32, bf16, widened int8 weights) prefetches rows ahead here,
    for weight rows of ``k`` inputs (the model's hidden size); sets it in the extension and returns it.

    Prefetching 4 KiB ahead helped on the CPUs the step was written on and costs 4-8% of a decode step on
    others (a 2-core Zen 3, where it costs 13% of a GEMV over rows of 576 and 0.5-7% at 1024-4096: docs/kernels.md).
    So it is measured once per machine and width, the first time a fused step is built: a GEMV over
    ``PREFETCH_PROBE_MB`` of fp32 weight both ways, timed round-robin (about 0.1 s), the choice kept with the
    kernel choices (:mod:`llmspeed.quant.kernels.tuning`, key :data:`PREFETCH_KEY`). With timing off
    (``LLMSPEED_AUTOTUNE=0``) and nothing stored, it prefetches.
    """
    ext = extension()
    if ext is None:
        return True
    on = _prefetch_choice(k)
    ext.float_prefetch(on)
    return on


@lru_cache(maxsize=8)
def _prefetch_choice(k: int) -> bool:
    """:func:`float_prefetch`'s choice for rows of ``k`` inputs: stored, else measured (timing on), else on."""
    from ..quant.kernels import tuning

    ext = extension()
    store, candidates, key = tuning.store(), {"prefetch", "stream"}, PREFETCH_KEY.format(k=k)
    choice = store.get(key, candidates)
    if choice is None and tuning.enabled() and ext is not None:
        w = torch.ones(PREFETCH_PROBE_MB * 2**20 // (4 * k), k)  # [n, k] fp32
        x, none = torch.ones(1, k), torch.empty(0)  # [1, k]

        def gemv(on: bool):
            def run() -> None:
                ext.float_prefetch(on)
                ext.gemv(x, w, none, none, 0, False)

            return run

        times = tuning.time_candidates({"prefetch": gemv(True), "stream": gemv(False)})
        if times:
            choice = tuning.pick(times, "prefetch")
            store.put(key, choice, times, "prefetch", candidates)
    return choice != "stream"


def gemm_rows() -> int:
    """Rows from which the fused step runs a matrix as a GEMM instead of its row loop (``TORCH_GEMM_ROWS`` of
    ``decode_cpu.cpp``; 64), where AMX tiles do not run it; 0 without the extension."""
    ext = extension()
    return 0 if ext is None else int(ext.gemm_rows())


def amx_available() -> bool:
    """Whether the fused step can run its matrices on AMX tiles here (see :attr:`FusedDecode.amx_rows`)."""
    ext = extension()
    return ext is not None and bool(ext.amx_usable())


def int8_dot_available() -> bool:
    """Whether layers with int8 activations (``quantize(..., activations="int8")``: int8 weights, and int4 with
    groups of whole 32-code blocks) multiply integer codes in the fused step here (AVX-512 VNNI, or AVX2's
    byte multiply-adds); elsewhere they compute on ``q * d`` in fp32."""
    ext = extension()
    return ext is not None and bool(ext.vnni_usable())


QUANT_FORMATS = ("int8", "int4", "nf4")
TILE = 16  # 4-bit codes the C++ tile decodes at once (the quantization kernel's q4_tile)


def _fusable(module: Any) -> bool:
    """Whether the C++ step reads this linear: an fp32/bf16 ``nn.Linear`` or a quantized linear (the protocol's
    ``QuantizedLinear``: int8, int4 or NF4 packed buffers described by its ``layout``).

    4-bit groups must split into whole 16-code tiles, and act-order modules (whose input is gathered
    through ``perm`` first) stay on the generic path.
    """
    if type(module) is nn.Linear:
        return module.weight.dtype in _WEIGHT_DTYPES
    layout = getattr(module, "layout", None)
    if getattr(module, "quant_format", None) not in QUANT_FORMATS or layout is None:
        return False
    if not module.qweight.is_contiguous() or module.config.act_order:
        return False
    if not layout.four_bit:
        return module.qweight.dtype == torch.int8
    return module.qweight.dtype == torch.uint8 and layout.tiles_of(TILE)


def _int8_activations(module: Any) -> bool:
    """Whether a linear :func:`_fusable` accepts reads its input as int8 codes (``QuantConfig.activations``)."""
    return getattr(getattr(module, "config", None), "activations", "float") == "int8"


def _parts(module: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(weight, scale, zero)`` the C++ step reads for a linear that :func:`_fusable` accepts.

    fp32/bf16 ``nn.Linear``: ``(weight, None, None)``; llmspeed's ``Int8Linear``: ``(qweight, scales,
    None)``; ``Int4Linear``: ``(qweight, scales, zeros)``; ``NF4Linear``: ``(qweight, group scales, None)``
    (double-quantized scales are expanded once, per snapshot).
    """
    if type(module) is nn.Linear:
        return module.weight, None, None
    fmt, q = module.quant_format, module.qweight
    if fmt == "int8":
        return q, module.scales, None
    if fmt == "int4":
        return q, module.scales.contiguous(), module.zeros.contiguous()
    if not module.config.double_quant:  # NF4: its own fp16 scales, no copy
        return q, module.scales, None
    return q, module.group_scales().half().contiguous(), None  # fp16 values already: exact


def _embedding_parts(module: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``(table, scale, zero, group)`` from which the C++ greedy steps read the input embedding's rows, or ``None``.

    An ``nn.Embedding`` (fp32 or bf16, without ``max_norm``): its weight, empty scale and zero, group 0. llmspeed's
    ``QuantizedEmbedding`` of an fp32 model (the rows of a quantized tied head): the head's :func:`_parts`, with
    its group size for 4-bit formats (0 for int8). Other embeddings run in Python (:meth:`FusedDecode.run`).
    """
    none = torch.empty(0)
    if type(module) is nn.Embedding:
        ok = module.max_norm is None and module.weight.dtype in _WEIGHT_DTYPES and module.weight.is_contiguous()
        return (module.weight.detach(), none, none, 0) if ok else None
    head = getattr(module, "head", None)
    if _embedding_dtype(module) != torch.float32 or type(head) is nn.Linear or head is None or not _fusable(head):
        return None
    q, scale, zero = _parts(head)
    if not scale.is_contiguous():
        return None
    return q, scale, _opt(zero), head.layout.group if head.layout.four_bit else 0


def _embedding_dtype(module: Any) -> torch.dtype | None:
    """The dtype of the vectors an input embedding returns (``nn.Embedding``'s weight, ``QuantizedEmbedding``'s
    ``dtype_reference``), or ``None`` for another module."""
    if type(module) is nn.Embedding:
        return module.weight.dtype
    reference = getattr(module, "dtype_reference", None)
    return reference.dtype if isinstance(reference, torch.Tensor) else None


def _check_linear(module: nn.Module, name: str, bias_ok: bool, lora_ok: bool = True) -> str | None:
    if lora_ok and fused_lora.is_lora(module):
        why = fused_lora.unfusable_reason(module)
        if why is not None:
            return f"{name} has LoRA adapters the fused step cannot apply: {why}"
        module = module.base_layer
    if not _fusable(module):
        what = getattr(module, "quant_format", None) or getattr(getattr(module, "weight", None), "dtype", "")
        return f"{name} is {type(module).__name__} ({what}): not an fp32/bf16 nn.Linear or an llmspeed int8/int4/nf4 linear"
    if module.bias is not None and not bias_ok:
        return f"{name} has a bias"
    return None


def _eps(norm: nn.Module) -> float | None:
    value = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if value is None else float(value)


def _check_norms(body: Any) -> str | None:
    """Every RMSNorm must share the final norm's epsilon (the C++ step takes one)."""
    eps = _eps(body.norm)
    for i, layer in enumerate(body.layers):
        norms = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                norms[f"self_attn.{name}"] = getattr(layer.self_attn, name)
        for name, norm in norms.items():
            if getattr(norm, "weight", None) is None or _eps(norm) != eps:
                return f"layers.{i}.{name} is not an RMSNorm with the final norm's epsilon {eps}"
    return None


def unsupported(model) -> str | None:
    """Why ``model`` cannot use the fused decode step as it is now, or ``None`` when it can."""
    hf = getattr(model, "hf", None)
    if hf is None:
        return "the model is not an llmspeed.Model wrapping a transformers model"
    cfg = hf.config.get_text_config()
    if cfg.model_type not in ARCHITECTURES:
        return f"model_type {cfg.model_type!r} is not one of {ARCHITECTURES}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'silu'"
    if model.spec.device.type != "cpu":
        return f"the model is on {model.spec.device}, not the CPU"
    body = getattr(hf, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    reason = _check_linear(hf.lm_head, "lm_head", bias_ok=False, lora_ok=False) or _check_norms(body)
    if reason:
        return reason
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            reason = _check_linear(
                getattr(attn, name), f"layers.{i}.self_attn.{name}", bias_ok=name != "o_proj"
            )
            if reason:
                return reason
        for name in ("gate_proj", "up_proj", "down_proj"):
            reason = _check_linear(getattr(mlp, name), f"layers.{i}.mlp.{name}", bias_ok=False)
            if reason:
                return reason
    return None


def _base(module: nn.Module) -> nn.Module:
    """The linear a LoRA wrapper wraps, else the module itself."""
    return module.base_layer if fused_lora.is_lora(module) else module


def _f32(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t.detach().float().contiguous()


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t


class _Snapshot:
    """The tensor list handed to C++, with what must stay the same for it to be valid.

    Checking a model from scratch (:func:`unsupported`) and gathering its tensors costs several times
    more than re-validating a snapshot: every module is still the same object at the same place, every
    tensor read still has the same storage and dtype (``nn.Module.to`` and :func:`llmspeed.cast` change a
    parameter's data in place), no LoRA wrapper anywhere has changed its adapters, scales or flags (one process-wide
    count, :func:`.fused_lora.state_changes`), and every tensor of the adapters a step reads has the version it was
    stacked at (checked in the extension with the pointers; an adapter no row reads is checked when one does).

    The modules are checked in place (each parent's ``_modules[name]`` is still the child read, the
    decoder layers' list included) only when a module was assigned somewhere in the process since the
    last check (a global registration hook counts them) or one of the parents gained or lost a child
    (``del``, ``ModuleList.insert``): walking some 400 children that each step's weight reads had pushed out
    of the cache was a visible part of a small model's step. Writing ``_modules`` directly, bypassing both,
    goes unseen.

    The tensor lists are handed to the extension once (``hold``) and each step passes the handle: converting
    some 900 Python tensors per call cost about 0.3 ms of a 13 ms step, and checking every source's pointer
    in Python about 1 ms once the step's weight reads had pushed them out of the cache; the extension checks
    the pointers and dtypes itself (``held_current``). The hold is released when the snapshot is dropped.
    """

    def __init__(self, hf: Any, ext: Any, lora_dtype: torch.dtype = torch.float16):
        body = hf.model
        self.lora_dtype = lora_dtype
        self.wrappers: list[Any] = []  # LoRA wrappers, in the C++ layout's order
        self.lora: list[torch.Tensor] = []  # (A, B) stacks per matrix per layer, or [] without LoRA
        _watch_assignments()
        self.assigned = _ASSIGNED[0]  # read before the modules, so that an assignment during the read counts
        checks: list[tuple[nn.Module, str, object]] = [(hf, "model", body), (hf, "lm_head", hf.lm_head)]
        checks += [(body, "norm", body.norm), (body, "layers", body.layers)]
        checks += [(body.layers, name, layer) for name, layer in body.layers._modules.items()]
        self.sources: list[torch.Tensor] = [body.norm.weight]
        self.weights: list[torch.Tensor] = []
        act8: list[bool] = []  # per matrix (layer by layer, _MATRICES order), then the head
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            owners = {"q_proj": attn, "k_proj": attn, "v_proj": attn, "o_proj": attn}
            owners.update(gate_proj=mlp, up_proj=mlp, down_proj=mlp)
            for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                checks.append((layer, name, getattr(layer, name)))
            parts = {}
            for name, owner in owners.items():
                module = getattr(owner, name)
                checks.append((owner, name, module))
                if fused_lora.is_lora(module):
                    checks.append((module, "base_layer", module.base_layer))
                    module = module.base_layer
                parts[name] = self._read(module)
                act8.append(_int8_activations(module))
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            biases = [_base(getattr(attn, n)).bias for n in ("q_proj", "k_proj", "v_proj")]
            qk_norms = [getattr(getattr(attn, n, None), "weight", None) for n in ("q_norm", "k_norm")]
            for name in ("q_norm", "k_norm"):
                if hasattr(attn, name):
                    checks.append((attn, name, getattr(attn, name)))
            extra = [t for t in biases + qk_norms if t is not None]
            self.sources += [ln1, ln2] + extra
            # the layout decode_cpu.cpp expects (PER_LAYER tensors)
            self.weights += [_f32(ln1), _f32(ln2)] + [_f32(b) for b in biases] + [_f32(t) for t in qk_norms]
            self.weights += [_opt(t) for n in _MATRICES for t in parts[n]]
        self.lm_head = [_opt(t) for t in self._read(hf.lm_head)]
        act8.append(_int8_activations(hf.lm_head))
        self.act8 = torch.tensor(act8) if any(act8) else torch.empty(0, dtype=torch.bool)  # [layers * 7 + 1]
        self.norm = _f32(body.norm.weight)
        self._stack_adapters(body)
        # read once: what the step needs from the model besides tensors (its structure is checked each step)
        self.num_heads = hf.config.get_text_config().num_attention_heads
        self.eps = _eps(body.norm)
        self.scaling = float(body.layers[0].self_attn.scaling)
        owners, names, children = zip(*checks)
        # nn.Module keeps its children dict for life (assigning, deleting or replacing a child edits it)
        self._dicts, self._names, self._children = [o._modules for o in owners], list(names), list(children)
        self._parents = list({id(d): d for d in self._dicts}.values())
        self._sizes = list(map(len, self._parents))
        self.ext = ext
        self.handle = ext.hold(self.weights, self.lm_head, self.lora, self.sources, self.lora_weights, self.slot_ends)
        weakref.finalize(self, ext.release, self.handle)

    def _stack_adapters(self, body: Any) -> None:
        """The LoRA stacks of every projection, one slot per adapter name (sorted), when any projection has one."""
        matrices = [getattr(layer.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, n)
                    for layer in body.layers for n in _MATRICES]  # fmt: skip
        self.wrappers = [m for m in matrices if fused_lora.is_lora(m)]
        self.slots = sorted({n for m in self.wrappers for n in m.lora_A})
        # set_adapter(name) leaves layers without ``name`` at None: one name must explain every layer
        named = {m.active for m in self.wrappers if m.active is not None}
        self.active = next(iter(named)) if len(named) == 1 else None
        self.one_active = len(named) <= 1 and all(
            m.active == (self.active if self.active in m.lora_A else None) for m in self.wrappers
        )
        if self.slots:
            for m in matrices:
                self.lora += fused_lora.stacks(m, self.slots, self.lora_dtype) if fused_lora.is_lora(m) else [torch.empty(0)] * 2
        self.lora_changes = fused_lora.state_changes()
        # each slot's tensors, slot by slot (versions checked in C++ for the slots a step reads)
        self.lora_weights: list[torch.Tensor] = []
        self.slot_ends: list[int] = []
        for name in self.slots:
            self.lora_weights += [t for m in self.wrappers for t in fused_lora.weights(m, name)]
            self.slot_ends.append(len(self.lora_weights))
        self.slot_index = {name: s for s, name in enumerate(self.slots)}

    def _read(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        parts = _parts(module)  # unsupported() ran first: the module is fusable
        self.sources += [t for t in parts if t is not None]
        return parts

    def valid(self, names: list[str | None] | None = None) -> bool:
        """Whether the snapshot still describes the model, for a step whose rows run adapters ``names``
        (``None``: check every adapter's tensors)."""
        if _ASSIGNED[0] != self.assigned or list(map(len, self._parents)) != self._sizes:
            # every check is (parent, child name, child): the parent's _modules[name] is still that child
            # (list equality compares items by identity first, and modules do not define __eq__)
            if list(map(dict.get, self._dicts, self._names)) != self._children:
                return False
            self.assigned, self._sizes = _ASSIGNED[0], list(map(len, self._parents))
        # every source's data pointer and dtype, and the versions of the adapters read (trained in place: restack)
        if fused_lora.state_changes() != self.lora_changes:
            return False
        read = range(len(self.slots)) if names is None else {self.slot_index[n] for n in names if n is not None}
        return self.ext.held_current(self.handle, list(read))

    def adapter_slots(self, names: list[str | None]) -> torch.Tensor:  # [n] int64
        """Each row's stack slot (``-1``: none); ``names`` as resolved by :meth:`FusedDecode.run`."""
        if not self.slots:
            return torch.empty(0, dtype=torch.long)
        return fused_lora.slot_ids(names, self.slots)


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
        self.upcast_bf16 = model.spec.dtype == torch.bfloat16 and cpu_matmul.crossover(torch.bfloat16) is not None
        self._snapshot: _Snapshot | None = None
        self._rope: RopeTable | None = None

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

    def _current(self, adapters: list[str | None] | None, n: int) -> tuple[_Snapshot, list[str | None]] | None:
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
        snap = self._snapshot = _Snapshot(self.model.hf, self.ext, self.lora_dtype)
        names = self._names(snap, adapters, n)
        return None if names is None else (snap, names)

    def run(self, step: StepInput, adapters: list[str | None] | None = None) -> torch.Tensor | None:  # [r, vocab]
        """Logits of the sampled rows (``step.rows``) of a :class:`~.runner.StepInput`, or ``None`` when the
        generic path must run it: the model is unsupported, a decode-only step has more than :attr:`max_rows`
        rows, or the step has prompt chunks and does not run here (:meth:`takes_prompt`).

        ``adapters``: each sequence's LoRA adapter name; a sequence without one (``None``, or ``adapters=None``
        for all) runs the model's active adapter (:func:`llmspeed.lora.set_adapter`), as the generic path does.
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
        with torch.inference_mode():
            emb = body.embed_tokens(ids)  # [n, E]
            cos, sin = self._rotary(body.rotary_emb, positions, emb)  # [n, D] each, fp32
            self.ext.float_prefetch(self.prefetch)
            self.ext.upcast_bf16(self.upcast_bf16)
            return self.ext.decode_step(
                emb.float().contiguous(),
                snap.handle,
                self.cache.key, self.cache.value,
                slots, tables, positions + 1,
                cos, sin,
                snap.norm,
                snap.num_heads, snap.eps, snap.scaling,
                snap.adapter_slots(slot_names),
                self.amx_rows,
                snap.act8,
                _EMPTY_ROWS if decode else torch.tensor(step.rows),  # [r]: the sampled rows' logits only
            )  # fmt: skip

    def greedy_steps(self, rows: Sequence[tuple[Sequence[int], int, int]], steps: int,
                     adapters: list[str | None] | None = None) -> tuple[list[list[int]], list[float]] | None:  # fmt: skip
        """``steps`` decode steps of the rows ``(block_table, position, token)`` back to back in one C++ call, each
        row's argmax token the next step's input: the tokens (``[steps][rows]``) and the ``time.perf_counter()``
        at which each step's tokens were known, or ``None`` where :meth:`run` would give ``None`` for a decode step
        of these rows, or the input embedding or the rotary module is one the C++ loop cannot read
        (:func:`_embedding_parts`, :func:`~.rope_table.static`).

        What a greedy row samples is :func:`~.sampling.argmax_rows` of its logits, and the C++ loop takes the
        same argmax of the same logits, so the tokens are those that ``steps`` calls of :meth:`run`, each
        followed by sampling, would give. Between steps nothing runs in Python: once a step has streamed the
        weights through the cache, each small torch op of the next step's inputs costs several times its
        warm time (docs/kernels.md has the measurements).
        The block tables must already hold ``position + steps`` tokens. ``adapters`` as in :meth:`run`.
        """
        bs = self.cache.block_size
        short = [i for i, (table, p, _) in enumerate(rows) if len(table) * bs < p + steps]
        if short:  # the padding block would take their keys and values: another sequence's cache
            raise ValueError(f"rows {short}: each block table must hold position + steps tokens for steps={steps}; "
                             f"grow them first")  # fmt: skip
        if len(rows) > self.max_rows or steps < 1:
            return None
        current = self._current(adapters, len(rows))
        body = self.model.hf.model
        embedding = _embedding_parts(body.embed_tokens)
        if current is None or embedding is None or not static(body.rotary_emb):
            return None
        snap, names = current
        last = max(p for _, p, _ in rows) + steps  # positions 0..last-1 are read
        cos, sin = self._rope_table(body.rotary_emb).tables(last, _embedding_dtype(body.embed_tokens))  # [P, D] each
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
                snap.act8,
                steps,
            )  # fmt: skip  # [steps, n] int64, [steps] seconds since start
        return tokens.tolist(), [start + t for t in known.tolist()]

    def _names(self, snap: _Snapshot, adapters: list[str | None] | None, n: int) -> list[str | None] | None:
        """Each sequence's adapter (``None``: the model's active one), or ``None`` when the step cannot run them."""
        names = [a if a is not None else snap.active for a in (adapters or [None] * n)]
        if not snap.one_active or not set(names) <= {None, *snap.slots}:
            return None  # layers set to different adapters, or an adapter the snapshot lacks: the generic path
        return names
