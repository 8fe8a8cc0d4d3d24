"""Per-token adapter routing: the LoRA delta of a batch whose tokens use different adapters.

Two ways to compute it, both exact:

* ``"concat"`` (one pass, the default for few adapters): concatenate the adapters' ``A`` along the
  rank axis and their ``B`` along the input axis; ``x @ A_cat.T`` gives every adapter's rank
  features for every token (``[T, R]``, ``R`` = sum of ranks), a mask keeps each token's own
  columns (times its scale; zero for tokens with no adapter) and one matmul with ``B_cat``
  finishes. Two GEMMs whatever the number of adapters, at the cost of ``R / r`` times the LoRA
  FLOPs, which stay small while ``R`` is small next to the hidden size.
* ``"segment"`` (the loop PEFT runs): for each adapter in the batch, gather its tokens, apply
  ``B(A(x))`` and scatter-add the result. Cheaper in FLOPs when many adapters share a batch.

``"auto"`` picks ``concat`` while ``R`` is at most a quarter of ``min(in, out)``. A layer whose adapters in the
batch differ in dtype (``add_adapter(dtype=...)``) always runs ``segment``, each adapter in its own dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from .layer import LoraLinear

METHODS = ("auto", "concat", "segment")
AXES = ("token", "row")


@dataclass
class Routing:
    """Which adapter each token (``axis="token"``) or each batch row (``axis="row"``) uses.

    Attributes:
        adapters: Distinct adapter names present, in order of first appearance.
        ids: ``[N]`` int64 index into ``adapters`` per token/row, ``-1`` for no adapter.
        axis: ``"token"``: ``N`` equals the number of tokens in the flattened input (the ragged
            batch of ``forward_batch``); ``"row"``: ``N`` equals the input's first dimension.
        method: ``"auto"``, ``"concat"`` or ``"segment"`` (see the module docstring).
        rows: ``[M]`` int64, for ``axis="token"``: the tokens whose logits the batch keeps (``forward_batch``'s
            ``logits_indices``); an output head, which receives only those ``M`` tokens, takes their adapters.
        cache: Concatenated weights per layer, masks and index lists, built on first use inside the context.
    """

    adapters: tuple[str, ...]
    ids: torch.Tensor  # [N]
    axis: str = "token"
    method: str = "auto"
    rows: torch.Tensor | None = None  # [M]
    cache: dict[object, object] = field(default_factory=dict)

    @classmethod
    def from_names(
        cls, names: list[str | None], axis: str, method: str, device: torch.device, rows: torch.Tensor | None = None
    ) -> Routing:
        """Build a routing from one adapter name (or ``None``) per token or row (``rows``: see the attribute)."""
        adapters = tuple(dict.fromkeys(n for n in names if n is not None))
        index = {name: i for i, name in enumerate(adapters)}
        ids = torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.long, device=device)
        if rows is not None:
            rows = rows.to(device=device, dtype=torch.long)
        return cls(adapters, ids, axis, method, rows)


def _flat_ids(routing: Routing, x: torch.Tensor) -> torch.Tensor:  # [T]
    """Adapter index per row of ``x.reshape(-1, in)``; checks the routing fits ``x``."""
    n = routing.ids.shape[0]
    tokens = x.numel() // x.shape[-1]
    if routing.axis == "token":
        if tokens == n:
            return routing.ids
        rows = routing.rows
        if rows is None or tokens != rows.shape[0]:
            raise ValueError(
                f"per-token adapters were given for {n} tokens but this layer received {tokens} "
                f"(input shape {tuple(x.shape)}); a LoRA output head under forward_batch's logits_indices "
                f"needs them too: per_token_adapters(model, names, logits_indices=...)"
            )
        if "head_ids" not in routing.cache:
            routing.cache["head_ids"] = routing.ids.index_select(0, rows)  # [M]
        return cast(torch.Tensor, routing.cache["head_ids"])
    if x.dim() < 2 or x.shape[0] != n:
        raise ValueError(
            f"per_row_adapters got names for {n} rows, but the batch has {x.shape[0] if x.dim() >= 2 else 'no'} rows "
            f"(this layer's input is {tuple(x.shape)}): give names one adapter name (or None) per row"
        )
    key = ("ids", tokens)
    if key not in routing.cache:
        routing.cache[key] = routing.ids.repeat_interleave(tokens // n)  # [T]
    return cast(torch.Tensor, routing.cache[key])


def _local(layer: LoraLinear, routing: Routing) -> tuple[list[str], torch.Tensor]:
    """The batch's adapters that exist on ``layer`` and a map from batch index to local index (-1: absent)."""
    names = [n for n in routing.adapters if n in layer.lora_A]
    local = {n: i for i, n in enumerate(names)}
    remap = torch.tensor(
        [local.get(n, -1) for n in routing.adapters] + [-1], dtype=torch.long, device=routing.ids.device
    )  # [n_adapters + 1]; the last entry serves id -1
    return names, remap


def _concat_weights(layer: LoraLinear, routing: Routing) -> tuple:
    key = id(layer)
    # restacked when an adapter changed inside the block (trained in place, its scale set): its tensors' versions
    state = [(layer.scaling[n], layer.weight_a(n)._version, layer.weight_b(n)._version)
             for n in routing.adapters if n in layer.lora_A]  # fmt: skip
    if key not in routing.cache or routing.cache[("state", key)] != state:
        routing.cache[("state", key)] = state
        names, remap = _local(layer, routing)
        a_cat = torch.cat([layer.weight_a(n) for n in names], dim=0)  # [R, in]
        b_cat = torch.cat([layer.weight_b(n) for n in names], dim=1)  # [out, R]
        ranks = [layer.rank(n) for n in names]
        scales = [layer.scaling[n] for n in names]
        owner = torch.repeat_interleave(
            torch.arange(len(names), device=a_cat.device), torch.tensor(ranks, device=a_cat.device)
        )  # [R]
        scale_table = torch.tensor(scales + [0.0], dtype=a_cat.dtype, device=a_cat.device)  # [n + 1]
        layout = (tuple(names), tuple(ranks), tuple(scales))  # layers with one layout share masks
        routing.cache[key] = (a_cat, b_cat, owner, scale_table, remap, layout)
    return cast(tuple, routing.cache[key])


def concat_delta(layer: LoraLinear, routing: Routing, x2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One-pass delta ``((x A_cat^T) * mask) B_cat^T``, the mask selecting each token's adapter: ``[T, out]``."""
    if not any(n in layer.lora_A for n in routing.adapters):
        return x2.new_zeros(x2.shape[0], layer.out_features)
    a_cat, b_cat, owner, scales, remap, layout = _concat_weights(layer, routing)
    key = ("mask", layout, ids.shape[0])
    mask = routing.cache.get(key)
    if mask is None:
        local = remap[ids]  # [T], -1: no adapter on this layer (id -1 reads remap's last entry)
        mask = (local[:, None] == owner[None, :]).to(x2.dtype) * scales[local][:, None]  # [T, R]
        routing.cache[key] = mask
    return ((x2 @ a_cat.T) * cast(torch.Tensor, mask)) @ b_cat.T  # [T, out]


def segment_delta(layer: LoraLinear, routing: Routing, x2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Loop over the adapters in the batch: gather their tokens, ``B(A(x))``, scatter-add: ``[T, out]``."""
    out = x2.new_zeros(x2.shape[0], layer.out_features)  # [T, out]
    key = ("rows", ids.shape[0])
    if key not in routing.cache:
        routing.cache[key] = [(ids == i).nonzero().squeeze(1) for i in range(len(routing.adapters))]
    for name, rows in zip(routing.adapters, cast(list, routing.cache[key])):  # rows: [t_i]
        if rows.numel() and name in layer.lora_A:
            xs = x2.index_select(0, rows).to(layer.weight_a(name).dtype)  # [t_i, in] (adapters may differ in dtype)
            sub = layer.lora_B[name](layer.lora_A[name](xs))  # [t_i, out]
            out.index_add_(0, rows, (sub * layer.scaling[name]).to(out.dtype))
    return out


def routed_delta(layer: LoraLinear, routing: Routing, x: torch.Tensor) -> torch.Tensor:  # [..., out]
    """The LoRA delta of ``layer`` for input ``x`` under ``routing``, in the adapter dtype."""
    if layer.training and any(getattr(d, "p", 0) > 0 for d in layer.lora_dropout.values()):
        raise RuntimeError(
            "mixed-adapter batches are for inference: call model.module.eval() (dropout is on)"
        )
    ids = _flat_ids(routing, x)  # [T]
    present = [n for n in routing.adapters if n in layer.lora_A]
    if not present:
        return x.new_zeros(*x.shape[:-1], layer.out_features)
    dtypes = {layer.weight_a(n).dtype for n in present}  # adapters may differ in dtype: the widest here
    x2 = x.reshape(-1, x.shape[-1]).to(functools.reduce(torch.promote_types, dtypes))  # [T, in]
    method = routing.method
    if method == "auto":
        total_rank = sum(layer.rank(n) for n in present)
        small = total_rank * 4 <= min(layer.in_features, layer.out_features)
        method = "concat" if small or len(present) == 1 else "segment"
    if len(dtypes) > 1:  # the segment loop runs each adapter in its own dtype, exactly as it runs alone
        method = "segment"
    compute = concat_delta if method == "concat" else segment_delta
    delta = compute(layer, routing, x2, ids)  # [T, out]
    return delta.reshape(*x.shape[:-1], layer.out_features)
