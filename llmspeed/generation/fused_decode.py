"""A fused CPU decode step for Llama-family models: one C++ call per step instead of ~2000 op dispatches.

At batch 1 a decode step of a small model is two things: reading every weight once, and dispatching
about 65 small torch ops per layer. On a 2-core CPU the eager step of SmolLM2-135M spends about
45 ms on the second. :class:`FusedDecode` runs decode-only steps (every sequence adds one token) of
a supported model through ``decode_cpu.cpp``: every layer, the paged-KV write and attention, the
final norm and the output projection in one call, with GEMVs that stream the weights at memory
speed. The model's own modules provide the weights (no copy), the embedding and the rotary tables,
so what runs is the model as it is at that step.

Supported (checked at every step, else the generic path runs): ``model_type`` ``llama``,
``mistral`` or ``qwen2`` with SiLU MLPs, plain ``nn.Linear`` projections in fp32 or bf16 (q/k/v
biases allowed), RMSNorm, on CPU. Quantized or LoRA-wrapped linears, other architectures and
other devices use the generic path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import cpp_build
from .kv_cache import PagedKVCache

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
ARCHITECTURES = ("llama", "mistral", "qwen2")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str | None]:
    return cpp_build.build("llmspeed_decode_cpu", SOURCE, ["decode_step", "gemv"])


def extension() -> ModuleType | None:
    """The compiled decode extension (built on first call), or ``None`` when it cannot be built."""
    return _build()[0]


def _plain_linear(module: nn.Module, name: str, bias_ok: bool) -> str | None:
    if type(module) is not nn.Linear:
        return f"{name} is {type(module).__name__}, not a plain nn.Linear"
    if module.weight.dtype not in _WEIGHT_DTYPES:
        return f"{name} weight is {module.weight.dtype}"
    if module.bias is not None and not bias_ok:
        return f"{name} has a bias"
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
    reason = _plain_linear(hf.lm_head, "lm_head", bias_ok=False)
    if reason:
        return reason
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            reason = _plain_linear(
                getattr(attn, name), f"layers.{i}.self_attn.{name}", bias_ok=name != "o_proj"
            )
            if reason:
                return reason
        for name in ("gate_proj", "up_proj", "down_proj"):
            reason = _plain_linear(getattr(mlp, name), f"layers.{i}.mlp.{name}", bias_ok=False)
            if reason:
                return reason
    return None


def _f32(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t.detach().float().contiguous()


class _Snapshot:
    """The weight list handed to C++, with what must stay the same for it to be valid.

    Checking a model from scratch (:func:`unsupported`) and gathering its weights cost about 4 ms a step
    for SmolLM2; re-validating a snapshot costs a few hundred microseconds: every linear is still the
    same object at the same place, and every tensor still has the same storage and dtype (``nn.Module.to``
    and :func:`llmspeed.cast` change a parameter's data in place).
    """

    def __init__(self, hf: Any):
        body = hf.model
        self.checks: list[tuple[object, str, object]] = [
            (hf, "lm_head", hf.lm_head),
            (body, "norm", body.norm),
        ]
        self.tensors: list[torch.Tensor] = [hf.lm_head.weight, body.norm.weight]
        self.weights: list[torch.Tensor] = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            owned = [(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
                (m, n) for n in ("gate_proj", "up_proj", "down_proj")
            ]
            owned += [
                (layer, "input_layernorm"),
                (layer, "post_attention_layernorm"),
                (layer, "self_attn"),
                (layer, "mlp"),
            ]
            for owner, name in owned:
                module = getattr(owner, name)
                self.checks.append((owner, name, module))
                if hasattr(module, "weight"):
                    self.tensors.append(module.weight)
                if getattr(module, "bias", None) is not None:
                    self.tensors.append(module.bias)
            self.weights += [
                _f32(layer.input_layernorm.weight),
                a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                _f32(layer.post_attention_layernorm.weight),
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                _f32(a.q_proj.bias), _f32(a.k_proj.bias), _f32(a.v_proj.bias),
            ]  # fmt: skip
        self.checks.append((hf, "model", body))
        self.layout = [(t.data_ptr(), t.dtype) for t in self.tensors]
        self.norm = _f32(body.norm.weight)

    def valid(self) -> bool:
        return all(getattr(o, n) is x for o, n, x in self.checks) and all(
            t.data_ptr() == p and t.dtype == d for t, (p, d) in zip(self.tensors, self.layout)
        )


class FusedDecode:
    """Decode-only steps of a supported model through the fused C++ step.

    Args:
        model: An :class:`llmspeed.Model` (checked with :func:`unsupported` whenever its modules change).
        cache: The generator's paged KV cache.
    """

    def __init__(self, model, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.ext: Any = extension()
        self._snapshot: _Snapshot | None = None

    def _current(self) -> _Snapshot | None:
        snap = self._snapshot
        if snap is not None and snap.valid():
            return snap
        self._snapshot = None
        if unsupported(self.model) is None:
            self._snapshot = _Snapshot(self.model.hf)
        return self._snapshot

    def run(self, decode: Sequence[tuple[Sequence[int], int, int]]) -> torch.Tensor | None:  # [n, vocab]
        """Logits for ``(block_table, position, token)`` per sequence, or ``None`` when the model is unsupported."""
        snap = None if self.ext is None else self._current()
        if snap is None:
            return None
        hf = self.model.hf
        body = hf.model
        bs = self.cache.block_size
        width = max(-(-(pos + 1) // bs) for _, pos, _ in decode)
        tables = [list(t[:width]) + [0] * (width - min(len(t), width)) for t, _, _ in decode]
        positions = torch.tensor([p for _, p, _ in decode])  # [n]
        ids = torch.tensor([tok for _, _, tok in decode])  # [n]
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p, _ in decode])  # [n]
        with torch.inference_mode():
            emb = body.embed_tokens(ids)  # [n, E]
            cos, sin = body.rotary_emb(emb[None], positions[None])  # [1, n, D] each
            norm = body.norm
            return self.ext.decode_step(
                emb.float().contiguous(),
                snap.weights,
                self.cache.key, self.cache.value,
                slots, torch.tensor(tables), positions + 1,
                cos[0].float().contiguous(), sin[0].float().contiguous(),
                snap.norm, hf.lm_head.weight,
                self.model.spec.num_heads,
                float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
                float(body.layers[0].self_attn.scaling),
            )  # fmt: skip
