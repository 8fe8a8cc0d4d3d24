"""Calibration data for calibrated quantization, and the layer-by-layer machinery that feeds it.

Three jobs, each a small function:

* :func:`calibration_tokens`: text (or token ids) -> ``[n_sequences, seq_len]`` token windows.
  The default text is the start of ``llmspeed.eval.pydoc_text("train")``, which never overlaps the
  perplexity windows (cut from the ``"eval"`` half).
* :func:`capture_layer_inputs`: run the model up to its first decoder layer once per batch and keep
  what that layer receives (hidden states and the keyword arguments: rotary embeddings, masks).
* :func:`layer_hessians` / :func:`run_layer`: run one decoder layer over all captured batches,
  summing ``X^T X`` of the inputs of chosen linear layers (forward hooks), or producing the inputs of
  the next layer, optionally with some weights replaced (``torch.func.functional_call``: the model
  itself is never modified).

Memory stays bounded by one layer's activations: ``n_sequences * seq_len * hidden`` floats for the
inputs and as many for the outputs (128 x 128 tokens x 576 channels x 4 bytes = 38 MB for SmolLM2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..protocol import CausalLM


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration data to use and how to batch it.

    Attributes:
        n_sequences: Token windows to use (at most; fewer if the text is shorter, at least one).
        seq_len: Tokens per window. Short windows keep calibration fast on a CPU: cost grows with
            ``n_sequences * seq_len``.
        batch_size: Windows per forward pass.
    """

    n_sequences: int = 128
    seq_len: int = 128
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("n_sequences", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


def default_calibration_text() -> str:
    """The calibration text used when none is given: the ``"train"`` half of the pydoc text."""
    from ..eval import pydoc_text

    return pydoc_text("train")


def calibration_tokens(model: CausalLM, calibration: Any, config: CalibrationConfig) -> torch.Tensor:
    """Token windows ``[n, config.seq_len]`` (int64) from ``calibration``; ``ValueError`` on bad input.

    ``calibration`` may be ``None`` (the default text), a string, a list of strings (joined with
    blank lines, then tokenized once) or an int64 tensor of token ids ``[n, T]`` or ``[T]``. The
    tokens are cut into consecutive non-overlapping windows, of which the first
    ``config.n_sequences`` are used.
    """
    if calibration is None:
        calibration = default_calibration_text()
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.dim() not in (1, 2):
            raise ValueError(
                f"calibration tensor must hold token ids, int64 [n, T] or [T]; got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
        ids = calibration.reshape(-1).long()
    else:
        if isinstance(calibration, str):
            calibration = [calibration]
        if not isinstance(calibration, Sequence) or not all(isinstance(t, str) for t in calibration):
            raise ValueError(
                f"calibration must be None, a string, a list of strings or a tensor of token ids; "
                f"got {type(calibration).__name__}"
            )
        text = "\n\n".join(t for t in calibration if t)
        if not text.strip():
            raise ValueError(
                "calibration text is empty: pass non-empty strings, or None for the default text"
            )
        if model.tokenizer is None:
            raise ValueError("calibration text needs a tokenizer: wrap the model with one, or pass token ids")
        ids = torch.tensor(model.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    n = min(config.n_sequences, ids.numel() // config.seq_len)
    if n < 1:
        raise ValueError(
            f"calibration is shorter than one window: {ids.numel()} tokens < seq_len={config.seq_len}; "
            f"pass more text or a smaller seq_len"
        )
    vocab = model.spec.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(
            f"calibration token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids[: n * config.seq_len].view(n, config.seq_len)  # [n, seq_len]


def decoder_layers(model: CausalLM) -> tuple[str, nn.ModuleList]:
    """``(qualified name, layers)`` of the model's stack of decoder layers (``model.layers`` in Llama)."""
    n = model.spec.num_layers
    for name, module in model.module.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return name, module
    raise ValueError(f"model has no nn.ModuleList of {n} decoder layers; calibrated quantization needs one")


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first decoder layer."""


@dataclass
class LayerInputs:
    """What one decoder layer receives, per batch: hidden states ``[b, T, hidden]`` and other kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_layer_inputs(model: CausalLM, tokens: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run ``tokens`` [n, T] through the model up to decoder layer 0; keep its inputs per batch."""
    _, layers = decoder_layers(model)
    captured = LayerInputs([], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model.spec.device
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)  # [b, T]
            try:
                model.module(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured.hidden) != -(-tokens.shape[0] // batch_size):
        raise RuntimeError("decoder layer 0 was not reached for every calibration batch")
    return captured


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(
    layer: nn.Module, inputs: LayerInputs, weights: dict[str, torch.Tensor] | None = None
) -> LayerInputs:
    """Outputs of ``layer`` for every batch (the next layer's inputs), with ``weights`` (name -> tensor) swapped in."""
    hidden = []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        if weights:
            out = torch.func.functional_call(layer, weights, args=(h,), kwargs=kw, strict=False)
        else:
            out = layer(h, **kw)
        hidden.append(_output(out))
    return LayerInputs(hidden, inputs.kwargs)


@torch.no_grad()
def layer_hessians(
    layer: nn.Module, inputs: LayerInputs, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Hessians ``2 X^T X / N`` of the inputs of linear layers ``names`` (relative to ``layer``).

    Linear layers fed the same tensor (q/k/v, gate/up) share one Hessian, computed once. Returns
    ``(hessians, groups)``: ``hessians[owner]`` is ``[in, in]`` fp32 and ``groups[owner]`` lists the
    names sharing it, owner first, in the order the forward pass reached them.
    """
    from .methods.gptq import accumulate_hessian, finalize_hessian

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    owner_of: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # strong refs: ids cannot be reused within a batch

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if name not in owner_of:
                owner_of[name] = next((o for t, o in seen if t is x), name)
            seen.append((x, name))
            if owner_of[name] == name:
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                    rows[name] = 0
                rows[name] += accumulate_hessian(sums[name], x.detach())
            if len({n for _, n in seen}) == len(names):
                raise _Stop  # every input is summed: the rest of the layer (at least the last matmul) is skipped

        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                layer(h, **kw)
            except _Stop:
                pass
        seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in owner_of]
    if missing:
        raise RuntimeError(f"linear layers {missing} were not called in the layer's forward pass")
    groups: dict[str, list[str]] = {}
    for n in sorted(names, key=list(owner_of).index):
        groups.setdefault(owner_of[n], []).append(n)
    return {o: finalize_hessian(sums[o], rows[o]) for o in groups}, groups


def split_plan(model: CausalLM, plan: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """Plan names per decoder layer (``relative name -> qualified name``) and the names outside the layers."""
    prefix, layers = decoder_layers(model)
    per_layer: list[dict[str, str]] = [{} for _ in layers]
    outside = []
    for name in plan:
        head, _, rest = name.partition(prefix + ".") if prefix else ("", "", name)
        index, _, relative = rest.partition(".")
        if head == "" and index.isdigit() and relative:
            per_layer[int(index)][relative] = name
        else:
            outside.append(name)
    return per_layer, outside


@torch.no_grad()
def quantize_sequentially(
    model: CausalLM,
    plan: dict[str, Any],
    tokens: torch.Tensor,
    batch_size: int,
    quantize_group: Any,
    desc: str = "calibrate",
    progress: bool = True,
) -> dict[str, nn.Module]:
    """Quantize the decoder layers in order, each on the outputs of the already-quantized ones.

    For layer ``i``: one pass with forward hooks sums the Hessians of its planned linear layers'
    inputs (:func:`layer_hessians`); ``quantize_group(linears, hessian, config)`` turns each set of
    linears that share an input (q/k/v, gate/up) into ``(quantized module, its float weight)``
    pairs (the weight must equal ``module.dequantize()``); a second pass with the
    dequantized weights swapped in produces the inputs of layer ``i + 1``. The model is never
    modified: the caller installs the returned ``{qualified name: module}`` all at once.
    Planned linears outside the decoder layers (an output head not skipped) are not handled here.
    """
    from tqdm.auto import tqdm

    _, layers = decoder_layers(model)
    per_layer, _ = split_plan(model, plan)
    inputs = capture_layer_inputs(model, tokens, batch_size)
    built: dict[str, nn.Module] = {}
    last = max((i for i, names in enumerate(per_layer) if names), default=-1)
    for i in tqdm(range(last + 1), desc=desc, disable=not progress, unit="layer"):
        layer, names = layers[i], per_layer[i]
        swapped: dict[str, torch.Tensor] = {}
        if names:
            hessians, groups = layer_hessians(layer, inputs, list(names))
            for owner, members in groups.items():
                linears = [layer.get_submodule(n) for n in members]
                pairs = quantize_group(linears, hessians[owner], plan[names[owner]])
                for rel, linear, (module, weight) in zip(members, linears, pairs):
                    built[names[rel]] = module
                    swapped[f"{rel}.weight"] = weight.to(linear.weight.device, linear.weight.dtype)
            del hessians
        if i < last:
            inputs = run_layer(layer, inputs, swapped)
    return built
