"""Helpers for the LoRA tests: a fake quantized linear that satisfies the protocol, quantized models,
a dense attention backend for ``forward_batch``, and a snapshot of every base tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import llmspeed


@dataclass(frozen=True)
class FakeInt8Config:
    """Per-row symmetric int8: the smallest config a quantized linear carries."""

    bits: int = 8


class FakeInt8Linear(nn.Module):
    """A quantized linear written only against the protocol (packed int8 buffer + fp32 row scales)."""

    quant_format = "fake-int8"

    def __init__(self, in_features, out_features, qweight, scale, bias, config):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.register_buffer("qweight", qweight)  # [out, in] int8
        self.register_buffer("scale", scale)  # [out, 1]
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FakeInt8Config) -> FakeInt8Linear:
        w = linear.weight.detach().float()  # [out, in]
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127  # [out, 1]
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, q, scale, bias, config)

    def dequantize(self) -> torch.Tensor:  # [out, in]
        return self.qweight.float() * self.scale

    def forward(self, x):
        return F.linear(
            x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


def fake_quantize(model, skip_head=True):
    """Replace every linear (but the output head) by FakeInt8Linear; return the model."""
    head = model.hf.get_output_embeddings()
    for name, module in list(model.linear_layers()):
        if not (skip_head and module is head):
            model.replace_linear(name, FakeInt8Linear.from_linear(module, FakeInt8Config()))
    return model


def quantize_real(model, method):
    """Quantize with llmspeed.quantize (a broken quant package fails these tests, it does not skip them)."""
    return llmspeed.quantize(model, method)


def base_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of every non-adapter parameter and buffer, keyed by name with LoRA wrappers removed."""
    out = {}
    for name, t in list(model.hf.named_parameters()) + list(model.hf.named_buffers()):
        if ".lora_" not in name:
            out[name.replace(".base_layer", "")] = t.detach().clone()
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


class DenseAttention:
    """A cache-free attention backend for one prefill of several sequences packed on a flat axis."""

    def __init__(self, seq_ids: torch.Tensor, positions: torch.Tensor):
        same = seq_ids[:, None] == seq_ids[None, :]  # [T, T]
        causal = positions[None, :] <= positions[:, None]  # [T, T]
        self.mask = same & causal

    def __call__(self, layer_idx, query, key, value, scaling):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)  # [1, H, T, D]
        value = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=self.mask, scale=scaling
        )  # [1, H, T, D]
        return out.transpose(1, 2)  # [1, T, H, D]


def packed_batch(sequences: list[torch.Tensor]):
    """Flatten sequences into (input_ids, positions, seq_ids, last-token indices)."""
    ids = torch.cat(sequences)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    seq_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)])
    lengths = torch.tensor([len(s) for s in sequences])
    return ids, positions, seq_ids, lengths.cumsum(0) - 1
