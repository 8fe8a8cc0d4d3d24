"""Verbs that put adapters on a model and choose which one runs.

``add_adapter`` wraps each targeted linear position in a :class:`LoraLinear` (once; later adapters
reuse the wrapper) through ``model.replace_linear``, freezes every non-adapter parameter and makes
the new adapter active. The model keeps a small registry (adapter name -> :class:`LoraConfig` and
the positions it covers) on its root module, which saving and merging read.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..model import Model, as_model
from ..protocol import CausalLM, holds_step_lock, step_lock
from .config import ALL_LINEAR, LoraConfig, adapter_dtype
from .layer import LoraLinear, check_adapter_name

_DISABLED = "_llmspeed_lora_disabled"  # (open lora.disabled blocks, flags before the first)
_REGISTRY = "_llmspeed_lora"
_UIDS = itertools.count()  # AdapterInfo.uid


@dataclass(frozen=True)
class AdapterInfo:
    """What the model remembers about one adapter: its config, the linear positions it covers and a
    process-wide ``uid`` that tells it from a later adapter added under the same name (the generator binds
    requests and prefix-cache blocks to it)."""

    config: LoraConfig
    positions: tuple[str, ...]
    uid: int = field(default_factory=lambda: next(_UIDS))



def wrapped(model: Any) -> CausalLM:
    """``model``, or for a transformers model the wrapper :func:`~llmspeed.model.as_model` gives it (the one
    :func:`add_adapter` changed in place), so every verb takes the model ``add_adapter`` took; a model with
    ``linear_layers`` (an ``llmspeed.Model`` or another CausalLM) passes without the protocol check, which costs tens
    of microseconds (some of these run between generation steps)."""
    return model if isinstance(model, Model) or hasattr(model, "linear_layers") else as_model(model)


def registry(model: CausalLM) -> dict[str, AdapterInfo]:
    """The model's adapter registry (created empty on first use), in the order adapters were added."""
    root = model.module
    if not isinstance(getattr(root, _REGISTRY, None), dict):
        root.__dict__[_REGISTRY] = {}
    return root.__dict__[_REGISTRY]


def adapter_names(model: CausalLM) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    model = wrapped(model)
    return list(registry(model))


def lora_layers(model: CausalLM) -> Iterator[tuple[str, LoraLinear]]:
    """``(position, LoraLinear)`` for every linear position that carries adapters."""
    model = wrapped(model)
    for name, module in model.linear_layers():
        if isinstance(module, LoraLinear):
            yield name, module


def require_adapter(model: CausalLM, name: object, arg: str = "name") -> AdapterInfo:
    """The registry entry of adapter ``name``, or ``ValueError`` listing the adapters that exist."""
    known = registry(model)
    if not isinstance(name, str) or name not in known:
        raise ValueError(
            f"{arg} must name an adapter on this model; got {name!r}; adapters: {list(known) or 'none'}"
        )
    return known[name]


def _head_names(model: CausalLM) -> set[str]:
    """Linear positions that are the output head (excluded from ``"all-linear"``, as PEFT does).

    The module's own ``get_output_embeddings()`` when it has one (a projection as wide as the vocabulary is
    not a head: PEFT keeps it), else every linear whose ``out_features`` is the vocabulary size.
    """
    root = model.module
    get_head = getattr(root, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        return {name for name, module in model.linear_layers() if module is head}
    vocab = model.spec.vocab_size
    return {name for name, module in model.linear_layers() if getattr(module, "out_features", None) == vocab}


def resolve_targets(model: CausalLM, targets: str | Sequence[str]) -> list[str]:
    """Linear positions selected by ``targets`` (``"all-linear"``, a regex, or name suffixes).

    A string is a regex matched against the whole position name (PEFT's rule); a string that is
    a plain identifier and matches nothing as a regex is taken as a suffix, so ``"q_proj"`` works.
    Raises ``ValueError`` listing the module names that exist when nothing matches.
    """
    model = wrapped(model)
    names = model.linear_names()
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = _head_names(model)
        chosen = [n for n in names if n not in heads]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"targets {targets!r} is not a regular expression ({err}); pass 'all-linear', a list of "
                f"module name suffixes such as ['q_proj', 'v_proj'], or a valid regex"
            ) from err
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen and re.fullmatch(r"[\w\-]+", targets):
            chosen = [n for n in names if n == targets or n.endswith("." + targets)]
    else:
        if not isinstance(targets, (list, tuple)) or not all(isinstance(s, str) for s in targets):
            raise ValueError(f"targets must be 'all-linear', a regex string or a list of module-name suffixes; "
                             f"got {targets!r}")  # fmt: skip
        suffixes = tuple(targets)
        chosen = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"targets {targets!r} match no linear layer of this model; module name suffixes here: {leaves} "
            f"(full names look like {names[0]!r}); pass 'all-linear', a list of suffixes or a regex"
        )
    return chosen


@holds_step_lock
def add_adapter(
    model: CausalLM,
    name: str,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = ALL_LINEAR,
    dropout: float = 0.0,
    init: str = "zeros",
    use_rslora: bool = False,
    dtype: torch.dtype | str = torch.float32,
    config: LoraConfig | None = None,
) -> LoraConfig:
    """Add LoRA adapter ``name`` to ``model`` and make it the active one.

    Args:
        model: Any :class:`~llmspeed.protocol.CausalLM`; the base may be float or quantized.
        name: A new adapter name (identifier-like).
        r, alpha, targets, dropout, init, use_rslora: See :class:`LoraConfig`; ignored when
            ``config`` is given.
        dtype: Dtype of the adapter matrices (fp32 by default, also on a bf16 or quantized base): fp32, bf16,
            fp16 or fp64, as a torch dtype or a name (``"bf16"``, ``"float16"``: :mod:`llmspeed.names`).
        config: A ready :class:`LoraConfig` instead of the keyword arguments.

    Returns:
        The adapter's config. Every non-adapter parameter of the model is frozen; the adapter's
        matrices are plain trainable ``nn.Parameter``s (see :func:`trainable_parameters`).

    Raises:
        ValueError: bad name, an existing name, bad hyper-parameters, or targets that match
            nothing; the model is unchanged.
    """
    model = as_model(model)  # a transformers model is wrapped (llmspeed.wrap) and changed in place
    check_adapter_name(name)
    if name in registry(model):
        raise ValueError(
            f"adapter {name!r} already exists on this model (adapters: {adapter_names(model)}); "
            f"pick another name or call lora.delete_adapter(model, {name!r}) first"
        )
    dtype = adapter_dtype(dtype)  # "bf16", torch.float16, ...; float8 and integer dtypes are refused here
    if config is None:
        config = LoraConfig(
            r=r,
            alpha=alpha,
            targets=targets if isinstance(targets, str) or not isinstance(targets, Iterable) else tuple(targets),
            dropout=dropout,
            init=init,
            use_rslora=use_rslora,
        )
    elif not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig; got {type(config).__name__}")
    positions = resolve_targets(model, config.targets)
    modules = dict(model.linear_layers())
    for pos in positions:  # validate every target before changing anything
        if not isinstance(modules[pos], LoraLinear):
            base = modules[pos]
            if not all(isinstance(getattr(base, a, None), int) for a in ("in_features", "out_features")):
                raise TypeError(
                    f"linear position {pos!r} holds {type(base).__name__}, which LoRA cannot wrap"
                )
    attach(model, name, config, {pos: (config.r, config.scale) for pos in positions}, dtype)
    return config


def attach(
    model: CausalLM, name: str, config: LoraConfig, shapes: dict[str, tuple[int, float]], dtype: torch.dtype
) -> None:
    """Create adapter ``name`` at each position in ``shapes`` (position -> (rank, scale)); register it.

    All or nothing: when a position fails, the adapter is removed from the positions done so far and
    the wrappers created for it are taken off again before the error propagates.
    """
    wrapped: list[str] = []  # positions wrapped here
    added: list[LoraLinear] = []  # layers that got the adapter
    try:
        for pos, (rank, scale) in shapes.items():
            module = model.module.get_submodule(pos)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                model.replace_linear(pos, module)
                wrapped.append(pos)
            module.add(name, rank, scale, dropout=config.dropout, init=config.init, dtype=dtype)
            added.append(module)
    except BaseException:
        for layer in added:
            layer.remove(name)
        for pos in wrapped:
            model.replace_linear(pos, cast(LoraLinear, model.module.get_submodule(pos)).base_layer)
        raise
    open_blocks = model.module.__dict__.get(_DISABLED)
    if open_blocks is not None:  # inside lora.disabled(model): the new wrappers run the base alone too, until it ends
        _switch_off([cast(LoraLinear, model.module.get_submodule(pos)) for pos in wrapped], open_blocks[1])
    freeze_base(model)
    registry(model)[name] = AdapterInfo(config, tuple(shapes))
    set_adapter(model, name)


def freeze_base(model: CausalLM) -> None:
    """Set ``requires_grad=False`` on every parameter that is not a LoRA matrix."""
    for pname, param in model.module.named_parameters():
        if ".lora_A." not in pname and ".lora_B." not in pname:
            param.requires_grad_(False)


def trainable_parameters(model: CausalLM, name: str) -> list[torch.Tensor]:
    """The ``A`` and ``B`` matrices of adapter ``name`` across all layers (for your own training loop)."""
    model = wrapped(model)
    require_adapter(model, name)
    params = []
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            params += [layer.weight_a(name), layer.weight_b(name)]
    return params


@holds_step_lock
def set_adapter(model: CausalLM, name: str | None) -> None:
    """Make ``name`` the adapter every forward pass applies (``None``: no adapter, base only)."""
    model = wrapped(model)
    if name is not None:
        require_adapter(model, name)
    for _, layer in lora_layers(model):
        layer.active = name if name is not None and name in layer.lora_A else None


def active_adapter(model: CausalLM) -> str | None:
    """The adapter set by :func:`set_adapter` (``None`` when none is)."""
    model = wrapped(model)
    for _, layer in lora_layers(model):
        if layer.active is not None:
            return layer.active
    return None


def adapter_identity(model: CausalLM, name: str | None) -> tuple[str, int] | None:
    """``(name, uid)`` of the adapter a request naming ``name`` runs (``None``: the active adapter, unless
    inside :func:`disabled`), or ``None`` when it runs none; a later adapter added under the same name
    has another ``uid``."""
    known = registry(model)
    if not known:
        return None
    if name is None:
        layers = [layer for _, layer in lora_layers(model)]
        if any(layer.disabled for layer in layers):
            return None
        name = next((layer.active for layer in layers if layer.active is not None), None)
    info = known.get(name) if name is not None else None
    return None if name is None or info is None else (name, info.uid)


@contextmanager
def layers_set(layers: Sequence[LoraLinear], attr: str, value: object) -> Iterator[None]:
    """Set ``attr`` to ``value`` on every layer inside the block; restore each layer's own value after."""
    previous = [getattr(layer, attr) for layer in layers]
    for layer in layers:
        setattr(layer, attr, value)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            setattr(layer, attr, old)


def _switch_off(layers: list[LoraLinear], before: dict[LoraLinear, bool]) -> None:
    """Disable ``layers``, recording in ``before`` each one's flag from before the first open block (put back when
    the last :func:`disabled` block leaves)."""
    for layer in layers:
        before.setdefault(layer, layer.disabled)
        layer.disabled = True


@contextmanager
def disabled(model: CausalLM) -> Iterator[CausalLM]:
    """Run the base model alone inside the block (adapters stay attached and active afterwards).

    Entering and leaving take the model's :func:`~llmspeed.protocol.step_lock` (the block itself does not: an Engine
    serving the model steps on inside it, its requests that name no adapter running the base): a step in flight in
    another thread finishes on the adapters it started with, never on some layers disabled and others not."""
    model = wrapped(model)
    lock = step_lock(model.module)
    state = model.module.__dict__
    with lock:
        layers = [layer for _, layer in lora_layers(model)]
        merged = sorted({n for layer in layers for n in layer.merged})
        if merged:
            raise ValueError(f"adapters {merged} are merged into the base weights; unmerge them to disable them")
        # blocks open on the model (threads may leave them in any order): the flags before the first, put back
        # when the last one leaves
        count, before = state.get(_DISABLED, (0, {}))
        _switch_off(layers, before)
        state[_DISABLED] = (count + 1, before)
    try:
        yield model
    finally:
        with lock:
            count, before = state[_DISABLED]
            if count > 1:
                state[_DISABLED] = (count - 1, before)
            else:
                del state[_DISABLED]
                for layer, old in before.items():
                    layer.disabled = old


@holds_step_lock
def delete_adapter(model: CausalLM, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters get their base layer back."""
    model = wrapped(model)
    require_adapter(model, name)
    layers = dict(lora_layers(model))
    merged = [pos for pos, layer in layers.items() if name in layer.merged]
    if merged:
        raise ValueError(
            f"adapter {name!r} is merged into {len(merged)} layers (e.g. {merged[0]}); unmerge it first"
        )
    for pos, layer in layers.items():
        if name in layer.lora_A:
            layer.remove(name)
            if not len(layer.lora_A):
                model.replace_linear(pos, layer.base_layer)
    del registry(model)[name]
