"""Where AWQ's input scales go: which op produces the tensor a group of linears reads, and a check that
dividing that op's output channels by ``s`` divides the linears' inputs by exactly ``s``.

AWQ multiplies a linear's input channels by ``s`` (``W diag(s)``, quantized) and must divide its input by
``s`` for the float function to stay the same. The division is folded into the op that produces the
input, so nothing is added at run time (the pairs of llm-awq / AutoAWQ for Llama-style layers):

=============================  ===================================  =====================================
linears fed one tensor          producer of that tensor              how ``1/s`` is folded
=============================  ===================================  =====================================
q_proj, k_proj, v_proj          ``input_layernorm`` (RMSNorm)        its weight ``/ s``
gate_proj, up_proj              ``post_attention_layernorm``         its weight ``/ s``
down_proj                       ``up_proj`` (``silu(g) * u`` is      its output rows (and bias) ``/ s``
                                linear in ``u``)
o_proj                          ``v_proj`` (attention output is      its output rows ``/ s``; with
                                linear in ``v``)                     grouped-query attention ``s`` is tied
                                                                     over the heads sharing a KV head
=============================  ===================================  =====================================

Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` take the two norm folds; its ``o_proj`` and ``down_proj`` have no row
fold (their producers are row slices of the fused linears) and are quantized unscaled.

Folding into a row producer is done on its *quantized* module: dividing a row of an int4 / NF4 /
int8 weight by a constant divides that row's scales and leaves the codes as they are (round-to-nearest
and GPTQ pick the same codes for a row scaled by a constant), so the producer needs no second pass.

:func:`check_fold` verifies a fold on real activations before it is used: it multiplies the producer's
output channels by a random positive vector and checks the consumer's input channels are multiplied
by the same (mapped) vector. A norm that computes ``(1 + w) * x`` (Gemma) or a producer that is not
linear in its weight fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..calibration import LayerInputs


@dataclass(frozen=True)
class Fold:
    """One input-scale fold: the consumers' input channels and the producer's output channels.

    Attributes:
        consumers: Relative names of the linears reading the tensor (the group, in any order).
        producer: Relative name of the producing module (an RMSNorm or a linear).
        kind: ``"norm"`` (divide ``producer.weight``) or ``"rows"`` (divide the producer linear's rows).
        tie: Consumer channels per producer channel, in blocks of ``head_dim`` (grouped-query
            attention: ``num_heads / num_kv_heads`` for o_proj); 1 elsewhere.
        head_dim: Block width of the tie (channels ``h * head_dim + d`` map to producer channel
            ``(h // tie) * head_dim + d``).
    """

    consumers: frozenset[str]
    producer: str
    kind: str
    tie: int = 1
    head_dim: int = 1

    def producer_scale(self, s: torch.Tensor) -> torch.Tensor:  # [consumer in] -> [producer out]
        """The producer channel scale of a (tied) consumer input scale ``s``."""
        if self.tie == 1:
            return s
        return s.view(-1, self.tie, self.head_dim)[:, 0].reshape(-1)

    def tie_stat(self, v: torch.Tensor) -> torch.Tensor:  # [consumer in] -> [consumer in]
        """Average a per-input-channel statistic over the channels that share a producer channel."""
        if self.tie == 1:
            return v
        blocks = v.view(-1, self.tie, self.head_dim)  # [kv heads, tie, head_dim]
        return blocks.mean(1, keepdim=True).expand_as(blocks).reshape(-1)


ATTN, MLP = "self_attn", "mlp"
_NORM_FOLDS = (
    ((f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"), "input_layernorm"),
    ((f"{MLP}.gate_proj", f"{MLP}.up_proj"), "post_attention_layernorm"),
    ((f"{ATTN}.qkv_proj",), "input_layernorm"),  # Phi-3's fused projections (no row folds: v and up are row slices)
    ((f"{MLP}.gate_up_proj",), "post_attention_layernorm"),
)
SUPPORTED = (
    "decoder layers with input_layernorm -> self_attn.{q,k,v}_proj and post_attention_layernorm -> "
    "mlp.{gate,up}_proj (Llama, Qwen2, Qwen3, Mistral), or Phi-3's fused self_attn.qkv_proj and mlp.gate_up_proj"
)


def candidate_folds(layer: nn.Module, groups: dict[str, list[str]]) -> tuple[list[Fold], list[Fold]]:
    """``(norm folds, row folds)`` that match this layer's groups of planned linears by name.

    ``groups``: owner -> relative names fed the same tensor. A norm fold needs the whole group
    (q, k and v all planned; a float k_proj could not absorb the scale). Row folds need the producer
    planned too; the o_proj fold needs ``self_attn.head_dim``.
    """
    members = {frozenset(g) for g in groups.values()}
    planned = {n for g in groups.values() for n in g}
    norms = [
        Fold(frozenset(c), p, "norm") for c, p in _NORM_FOLDS if frozenset(c) in members and _has(layer, p)
    ]
    rows = []
    if frozenset({f"{MLP}.down_proj"}) in members and f"{MLP}.up_proj" in planned:
        rows.append(Fold(frozenset({f"{MLP}.down_proj"}), f"{MLP}.up_proj", "rows"))
    head_dim = getattr(_get(layer, ATTN), "head_dim", None)
    if frozenset({f"{ATTN}.o_proj"}) in members and f"{ATTN}.v_proj" in planned and isinstance(head_dim, int):
        o_in = _linear(layer, f"{ATTN}.o_proj").in_features
        v_out = _linear(layer, f"{ATTN}.v_proj").out_features
        if o_in % v_out == 0 and v_out % head_dim == 0:
            rows.append(
                Fold(frozenset({f"{ATTN}.o_proj"}), f"{ATTN}.v_proj", "rows", o_in // v_out, head_dim)
            )
    return norms, rows


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    return cast(nn.Linear, layer.get_submodule(name))


def _get(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _has(layer: nn.Module, name: str) -> bool:
    module = _get(layer, name)
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1


def scaled_params(layer: nn.Module, fold: Fold, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """The producer's parameters with its output channels divided by ``r`` [producer out]."""
    producer = _linear(layer, fold.producer)  # or a norm: both have .weight (and maybe .bias)
    weight = producer.weight.detach()
    if fold.kind == "norm":
        return {f"{fold.producer}.weight": weight / r.to(weight.dtype)}
    params = {f"{fold.producer}.weight": weight / r.to(weight.dtype)[:, None]}
    if getattr(producer, "bias", None) is not None:
        params[f"{fold.producer}.bias"] = producer.bias.detach() / r.to(weight.dtype)
    return params


def fold_params(layer: nn.Module, fold: Fold, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float parameters with input scale ``s`` [consumer in] folded in: consumers' weights ``* s``,
    producer's output channels ``/ s``. The layer's function is unchanged (the float oracle of AWQ)."""
    params = scaled_params(layer, fold, fold.producer_scale(s))
    for name in sorted(fold.consumers):
        weight = _linear(layer, name).weight.detach()  # [out, in]
        params[f"{name}.weight"] = weight * s.to(weight.dtype)
    return params


@torch.no_grad()
def check_fold(layer: nn.Module, probe: LayerInputs, fold: Fold, seed: int = 0) -> bool:
    """Whether dividing ``fold.producer``'s output channels by ``r`` divides the consumers' input by ``r``.

    Runs the float layer on ``probe`` (one short window) twice: as is, and with the producer scaled
    by a random ``r`` in [0.5, 2]; compares the first consumer's inputs, within the rounding of their dtype.
    """
    consumer = _linear(layer, sorted(fold.consumers)[0])
    in_f = consumer.in_features
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(in_f, generator=g) * 1.5 + 0.5  # [in]
    s = fold.tie_stat(s)  # tied channels share one value
    r = fold.producer_scale(s)  # [producer out]
    seen: list[torch.Tensor] = []
    dtypes: list[torch.dtype] = []

    def hook(module: nn.Module, args: Any) -> None:
        seen.append(args[0].detach().float())
        dtypes.append(args[0].dtype)

    handle = consumer.register_forward_pre_hook(hook)
    try:
        h, kw = probe.hidden[0], probe.kwargs[0]
        layer(h, **kw)
        torch.func.functional_call(
            layer, scaled_params(layer, fold, r.to(h.device)), args=(h,), kwargs=kw, strict=False
        )
    except Exception:
        return False
    finally:
        handle.remove()
    if len(seen) != 2:
        return False
    expected = seen[0] / s.to(seen[0].device)  # [b, T, in]
    # bf16 / fp16 layers round both passes (about 1.5 eps of the largest value apart); a (1 + w) norm is off by O(1)
    eps = torch.finfo(dtypes[0]).eps if dtypes[0].is_floating_point else 0.0
    tol = max(1e-3, 8 * eps) * float(seen[0].abs().max().clamp_min(1e-6))
    return bool((seen[1] - expected).abs().max() <= tol)
