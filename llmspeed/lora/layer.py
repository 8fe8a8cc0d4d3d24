"""``LoraLinear``: one wrapper that adds named low-rank adapters to any base linear.

The base may be an ``nn.Linear`` or any quantized module that follows
:class:`llmspeed.protocol.QuantizedLinear` (int8, int4, NF4, ...): the wrapper only calls
``base_layer(x)`` and, for merging, ``dequantize()`` and ``type(base).from_linear``. The base is
frozen; the adapters are plain ``nn.Linear`` modules (``lora_A[name]``: ``[r, in]``,
``lora_B[name]``: ``[out, r]``) kept in their own dtype (fp32 by default): the input is cast to
the adapter dtype and the delta cast back to the base's output dtype.
"""

from __future__ import annotations

import math
import re
from typing import cast

import torch
from torch import nn

from .config import adapter_dtype, check_adapter_args
from .routing import Routing, routed_delta

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")

# Changes to any LoraLinear's adapters, scales or flags in this process (names, ``scaling``, ``active``,
# ``disabled``, ``merged``, ``training``): caches of a wrapper's state (the fused decode step's adapter stacks)
# compare one number instead of reading every wrapper. Changes of the adapter tensors' values are not counted:
# their ``_version`` is.
STATE_CHANGES = [0]
_WATCHED = frozenset({"active", "disabled", "merged", "training", "scaling"})


class _Scales(dict):
    """``LoraLinear.scaling``: a dict that counts every change of its items in :data:`STATE_CHANGES`."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        STATE_CHANGES[0] += 1

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        STATE_CHANGES[0] += 1

    # typeshed's dict.__ior__ has this same ignore: |= keeps the dict's types where | widens them, which mypy
    # reports on any override of it
    def __ior__(self, other):  # type: ignore[misc]
        STATE_CHANGES[0] += 1
        return super().__ior__(other)

    def _counted(name: str):  # type: ignore[misc]  # a dict method that also counts a change
        method = getattr(dict, name)

        def counted(self, *args, **kwargs):
            STATE_CHANGES[0] += 1
            return method(self, *args, **kwargs)

        counted.__name__ = name
        return counted

    pop = _counted("pop")
    popitem = _counted("popitem")
    clear = _counted("clear")
    update = _counted("update")
    setdefault = _counted("setdefault")
    del _counted


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it can name an adapter (a ModuleDict key), else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(
            f"adapter name must be an identifier-like string (letters, digits, '_' or '-', not a "
            f"ModuleDict method name); got {name!r}"
        )
    return name


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """A base linear plus named LoRA adapters; forward is ``base(x) + scale * B(A(dropout(x)))``.

    Attributes:
        base_layer: The wrapped (frozen) linear, float or quantized.
        lora_A, lora_B: ``ModuleDict`` of adapter matrices keyed by adapter name (PEFT's layout).
        lora_dropout: ``ModuleDict`` of dropout modules keyed by adapter name.
        scaling: Adapter name -> scale (``alpha / r`` or ``alpha / sqrt(r)``).
        active: Name of the adapter applied in forward, or ``None``.
        disabled: When true, forward is the base alone.
        merged: Names of adapters folded into the base weight, in merge order (a tuple: assign a new one).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, LoraLinear):
            raise TypeError(
                "base_layer is already a LoraLinear; add adapters to it instead of wrapping it twice"
            )
        for attr in ("in_features", "out_features"):
            if not isinstance(getattr(base_layer, attr, None), int):
                raise TypeError(
                    f"base_layer must be nn.Linear or a quantized linear exposing in_features/out_features; "
                    f"got {type(base_layer).__name__}"
                )
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.disabled = False
        self.merged: tuple[str, ...] = ()
        self.routing: Routing | None = None  # set by llmspeed.lora.per_token_adapters / per_row_adapters
        self.premerge: dict[str, nn.Module] = {}  # base replaced by a merge, restored by unmerge
        self.train(base_layer.training)  # a wrapper put into an eval model must not turn its dropout on

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()``, ``.half()``, ``.cuda()``...: the bases kept for :meth:`unmerge` (outside the module tree, so
        out of the state dict) move with the layer, as the base in use does."""
        for kept in self.premerge.values():
            kept._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value) -> None:
        if name in _WATCHED:  # count the change (STATE_CHANGES); ``scaling`` stays a counting dict
            STATE_CHANGES[0] += 1
            if name == "scaling":
                value = _Scales(value)
            elif name == "merged":
                value = tuple(value)
        super().__setattr__(name, value)

    @property
    def in_features(self) -> int:
        """Input width of the base layer."""
        return cast(int, self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        """Output width of the base layer."""
        return cast(int, self.base_layer.out_features)

    def extra_repr(self) -> str:
        ranks = {name: self.rank(name) for name in self.lora_A}
        return f"adapters={ranks}, active={self.active!r}, merged={self.merged}"

    # --- adapters ------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init: str = "zeros",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create adapter ``name`` of rank ``r``: ``A`` Kaiming-uniform, ``B`` zero (or random).

        Raises:
            ValueError: A bad argument (named in the message); the layer is left unchanged.
        """
        check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        plain = check_adapter_args(r, dropout, init, scale=scale)
        r, dropout, scale = int(plain["r"]), plain["dropout"], plain["scale"]
        dtype = adapter_dtype(dtype)
        device = module_device(self.base_layer)
        # trainable matrices also when the caller is under inference_mode (inference tensors cannot be trained)
        with torch.inference_mode(False):
            a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # weight [r, in]
            b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # weight [out, r]
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            if init == "zeros":
                nn.init.zeros_(b.weight)
            else:
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for store in (self.lora_A, self.lora_B, self.lora_dropout):  # new modules start in training mode
            store[name].train(self.training)
        self.scaling[name] = float(scale)

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` (it must not be merged)."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.scaling[name]
        if self.active == name:
            self.active = None

    def weight_a(self, name: str) -> torch.Tensor:  # [r, in]
        """``A`` of adapter ``name``."""
        return cast(nn.Linear, self.lora_A[name]).weight

    def weight_b(self, name: str) -> torch.Tensor:  # [out, r]
        """``B`` of adapter ``name``."""
        return cast(nn.Linear, self.lora_B[name]).weight

    def rank(self, name: str) -> int:
        """Rank of adapter ``name`` on this layer."""
        return self.weight_a(name).shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:  # [out, in]
        """``scale * B @ A`` of adapter ``name`` in the adapter dtype."""
        return self.scaling[name] * (self.weight_b(name) @ self.weight_a(name))  # [out, in]

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        result = self.base_layer(x)  # [..., out]
        if self.routing is not None:
            if self.merged:
                raise RuntimeError(
                    f"adapters {self.merged} are merged into the base; unmerge them before running a "
                    f"mixed-adapter batch"
                )
            delta = routed_delta(self, self.routing, x)  # [..., out] in the adapter dtype
            return result + delta.to(result.dtype)
        name = self.active
        if self.disabled or name is None or name in self.merged:
            return result
        x = x.to(self.weight_a(name).dtype)
        delta = (
            self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
        )  # [..., out]
        return result + delta.to(result.dtype)
