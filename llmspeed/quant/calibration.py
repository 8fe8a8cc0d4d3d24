"""The layer-by-layer machinery of calibrated quantization (its data: :mod:`.calibration_data`).

* :func:`capture_layer_inputs`: run the model up to its first decoder layer once per batch and keep
  what that layer receives (hidden states and the keyword arguments: rotary embeddings, masks).
* :func:`layer_hessians` / :func:`run_layer`: run one decoder layer over all captured batches,
  summing ``X^T X`` of the inputs of chosen linear layers (forward hooks), or producing the inputs of
  the next layer, optionally with some weights replaced (``torch.func.functional_call``: the model
  itself is never modified).
* :func:`quantize_layer` / :func:`quantize_sequentially`: quantize each decoder layer in one
  forward pass over every calibration window, its linears in the order the pass reaches them.

Memory stays bounded by one layer's activations over the calibration set: ``n_sequences * seq_len``
tokens times the layer's widest activation (128 x 128 tokens x 1536 MLP channels x 4 bytes = 100 MB
per tensor for SmolLM2), plus one Hessian at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..protocol import CausalLM
from .hessian import accumulate_hessian, finalize_hessian, float_target_map


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


def _kind(config: Any) -> str:
    return config.format + (" hadamard" if getattr(config, "hadamard", False) else "")


PROBE_TOKENS = 16  # tokens of the one window that finds which linears share an input


@dataclass
class LinearGroup:
    """What ``quantize_group`` receives for linears fed one tensor ``X`` (q/k/v, gate/up, or one linear).

    Attributes:
        names: Relative names in the decoder layer, owner (the first one called) first.
        qualified: The same, as qualified names in the model.
        linears: The modules; inside :func:`quantize_layer` their ``.weight`` is the float clone being
            quantized (earlier groups of the layer already hold their quantized values).
        hessian: ``2 X^T X / N`` ``[in, in]`` fp32 over every calibration token.
        abs_mean: ``mean |X|`` per input channel ``[in]`` fp32 (AWQ's activation statistic).
        inputs: ``X`` itself, ``[N, in]`` (the tokens the Hessian sums over): where ``N < in``, output errors are
            cheaper from it than from the Hessian (:func:`~llmspeed.quant.methods.awq.output_error`).
    """

    names: list[str]
    qualified: list[str]
    linears: list[nn.Linear]
    hessian: torch.Tensor
    abs_mean: torch.Tensor
    inputs: torch.Tensor | None = None


@torch.no_grad()
def quantize_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    names: dict[str, str],
    groups: dict[str, list[str]],
    quantize_group: Any,
    plan: dict[str, Any],
    need_output: bool = True,
    float_inputs: dict[str, torch.Tensor] | None = None,
    target_damp: float = 0.1,
) -> tuple[LayerInputs | None, dict[str, nn.Module]]:
    """Quantize one decoder layer in a single forward pass over all calibration windows ("true sequential").

    ``inputs`` must be one batch (every window at once). ``float_inputs`` (owner -> what it receives in
    the float model, ``[b, T, in]``): fit each group's clones to the float output first (see
    :func:`quantize_sequentially`). The layer runs through
    ``torch.func.functional_call`` on clones of its planned weights; a forward pre-hook on each
    group owner (``groups``: owner -> the relative names fed the same tensor) computes the Hessian of
    the tensor it receives, calls ``quantize_group(group: LinearGroup, config)``, which returns
    ``[(module, float weight the pass should use)]`` per member, and copies those weights into the
    clones before the matmul reads them. So each linear's Hessian sees
    the quantization error of the linears before it in the same layer, and the pass's output is
    the next layer's input with the whole layer quantized. ``names`` maps relative to qualified
    names. Returns ``(outputs or None, {qualified name: module})``; the layer is never modified.
    """
    if len(inputs.hidden) != 1:
        raise ValueError(
            f"inputs must be one batch of every calibration window; got {len(inputs.hidden)} batches"
        )
    for members in groups.values():
        if len({plan[names[n]] for n in members}) > 1:
            raise ValueError(
                f"linears fed one input are quantized together, so they need one format and rotation; got "
                f"{ {names[n]: _kind(plan[names[n]]) for n in members} }: list all of them in int8_layers "
                f"(hadamard_layers) or none"
            )
    params = {
        f"{rel}.weight": cast(torch.Tensor, layer.get_submodule(rel).weight).detach().clone() for rel in names
    }
    built: dict[str, nn.Module] = {}

    def make_hook(owner: str):
        def hook(module, args):
            x = args[0].detach()  # [b, T, in]
            hessian = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            hessian = finalize_hessian(hessian, accumulate_hessian(hessian, x))
            abs_mean = x.reshape(-1, x.shape[-1]).abs().float().mean(0)  # [in]
            members = groups[owner]
            linears = [cast(nn.Linear, layer.get_submodule(n)) for n in members]  # .weight: the float clone
            if float_inputs is not None:  # fit each clone to the float layer's output: W <- W T
                t = float_target_map(float_inputs[owner], x, hessian, target_damp)  # [in, in]
                for rel in members:
                    clone = params[f"{rel}.weight"]  # [out, in]
                    clone.copy_((clone.float() @ t).to(clone.dtype))
            group = LinearGroup(list(members), [names[n] for n in members], linears, hessian, abs_mean,
                                x.reshape(-1, x.shape[-1]))  # fmt: skip
            for rel, (module, weight) in zip(members, quantize_group(group, plan[names[owner]])):
                built[names[rel]] = module
                target = params[f"{rel}.weight"]
                target.copy_(weight.to(target.device, target.dtype))
            if not need_output and len(built) == len(names):
                raise _Stop  # the last layer: its output is not needed

        return hook

    handles = [layer.get_submodule(owner).register_forward_pre_hook(make_hook(owner)) for owner in groups]
    out = None
    try:
        out = torch.func.functional_call(
            layer, params, args=(inputs.hidden[0],), kwargs=inputs.kwargs[0], strict=False
        )
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(names.values()) - set(built))
    if missing:
        raise RuntimeError(f"linear layers {missing} were not called in the layer's forward pass")
    return (None if out is None else LayerInputs([_output(out)], inputs.kwargs)), built


@torch.no_grad()
def capture_group_inputs(
    layer: nn.Module, inputs: LayerInputs, owners: Sequence[str]
) -> tuple[LayerInputs, dict[str, torch.Tensor]]:
    """The float layer's outputs over ``inputs`` and the tensor each of ``owners`` receives (``[b, T, in]``)."""
    seen: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args):
            seen[name] = args[0].detach()

        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in owners]
    try:
        out = run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@torch.no_grad()
def quantize_sequentially(
    model: CausalLM,
    plan: dict[str, Any],
    tokens: torch.Tensor,
    quantize_group: Any,
    desc: str = "calibrate",
    progress: bool = True,
    float_targets: bool = False,
    target_damp: float = 0.1,
) -> dict[str, nn.Module]:
    """Quantize the decoder layers in order, each on the outputs of the already-quantized ones.

    Decoder layer 0's inputs are captured for all ``tokens`` [n, T] at once; then each layer runs
    once (:func:`quantize_layer`), quantizing its planned linears as the forward pass reaches them
    and producing the next layer's inputs. Which linears share an input (q/k/v, gate/up: one
    Hessian and one ``quantize_group`` call on their concatenated rows) is found first on a probe
    of one short window (:func:`layer_hessians`, a negligible cost). The model is never modified:
    the caller installs the returned ``{qualified name: module}`` all at once. Planned linears
    outside the decoder layers (an output head not skipped) are not handled here.

    ``float_targets``: also carry the float model's hidden states layer by layer, and before each group is
    quantized replace its float clones ``W`` by ``W T`` (:func:`~llmspeed.quant.hessian.float_target_map`,
    ridge ``target_damp``), the weights that best reproduce the float model's output from the quantized
    model's inputs. One more float pass per layer, and that layer's linear inputs held at once.
    """
    from tqdm.auto import tqdm

    _, layers = decoder_layers(model)
    per_layer, _ = split_plan(model, plan)
    inputs = capture_layer_inputs(model, tokens, tokens.shape[0])
    floats = inputs if float_targets else None
    probe = capture_layer_inputs(model, tokens[:1, :PROBE_TOKENS], 1)
    built: dict[str, nn.Module] = {}
    last = max((i for i, names in enumerate(per_layer) if names), default=-1)
    for i in tqdm(range(last + 1), desc=desc, disable=not progress, unit="layer"):
        layer, names = layers[i], per_layer[i]
        if not names:
            inputs, probe = run_layer(layer, inputs), run_layer(layer, probe)
            if floats is not None:
                floats = run_layer(layer, floats)
            continue
        _, groups = layer_hessians(layer, probe, list(names))
        targets = None
        if floats is not None:
            floats, targets = capture_group_inputs(layer, floats, list(groups))
        out, modules = quantize_layer(
            layer,
            inputs,
            names,
            groups,
            quantize_group,
            plan,
            need_output=i < last,
            float_inputs=targets,
            target_damp=target_damp,
        )
        del targets
        built.update(modules)
        if out is not None:  # every layer but the last
            inputs, probe = out, run_layer(layer, probe)  # the probe only needs the float layer's structure
    return built
