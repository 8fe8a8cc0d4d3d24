"""The shared plumbing of the quantized linears (:mod:`.modules`): bias, kernel choice and caching, autograd, repr."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..precision import cpu_matmul
from . import primitives as P
from .config import QuantConfig
from .hadamard import rotate, rotation_group
from .kernels import check_kernel_name, select
from .kernels.cpp import quantize_activations as cpp_round
from .kernels.tuning import rows_bucket
from .layout import QuantLayout
from .methods.registry import get_method


class _QuantMatmul(torch.autograd.Function):
    """``y = x @ W.T`` for a quantized ``W``; gradient only for ``x``, from the dequantized weight.

    ``x`` arrives already gathered through ``perm`` for act-order modules, so the backward pass uses the
    weight in packed column order (:meth:`QuantizedLinearBase.packed_dequantize`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinearBase) -> torch.Tensor:
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad [..., out]
        w = ctx.module.packed_dequantize(grad.dtype)  # [out, in], freed when backward returns
        if cpu_matmul.slow_16_bit(grad.device.type, grad.dtype):
            # no fast 16-bit GEMM here (grad @ w, w row-major, is its slowest case): the fp32 product of the same
            # 16-bit operands, rounded once, as the 16-bit GEMM would (llmspeed.training.cpu_autocast)
            return (grad.float() @ w.float()).to(grad.dtype), None  # [..., in]
        return grad @ w, None


_STATE = ("scales", "zeros", "scales_scale", "scales_offset")  # float buffers whose dtype the kernels fix


class QuantizedLinearBase(nn.Module):
    """Shared plumbing of the quantized linears: bias, kernel choice and caching, autograd, repr."""

    quant_format: str = ""
    layout: QuantLayout  # the packed weight's geometry (group, groups, padded width): what every kernel reads
    qweight: torch.Tensor  # buffers, registered per format (annotated for type checkers)
    scales: torch.Tensor
    zeros: torch.Tensor  # Int4Linear only
    perm: torch.Tensor  # Int4Linear with config.act_order only

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: torch.Tensor | None):
        super().__init__()
        if config.format != self.quant_format:
            raise ValueError(
                f"config.format must be {self.quant_format!r} for {type(self).__name__}; got {config.format!r}"
            )
        check_kernel_name(config.kernel, config.format)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if config.hadamard and self.in_features % rotation_group(config):
            raise ValueError(
                f"hadamard needs group_size to divide in_features (no padded group); got in_features="
                f"{self.in_features}, group_size={config.group_size}"
            )
        self.config = config
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},); got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._permuted = config.act_order  # Int4Linear registers ``perm`` [in] when set
        self._rotated = config.hadamard  # inputs rotated within groups (hadamard.rotate) before the kernel
        self._int8_activations = config.activations == "int8"
        self._kernels: dict[tuple, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {}  # (dtype, device, rows bucket) -> (bound kernel, any leading dims)
        self._kernel_state: dict[tuple, object] = {}  # (kernel name, device) -> prepared tensors

    # --- to implement per format ---------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in]
        """The float weight this module represents (the test oracle of every kernel); ``rows``: only those output
        rows (a slice, or int64 row indices: the tied input embedding looks tokens up this way)."""
        raise NotImplementedError

    def packed_dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r, in]
        """The float weight in packed column order and basis (differs from :meth:`dequantize` only with act_order
        and hadamard).

        Kernels see the input already gathered through ``perm`` or rotated, so reference kernels multiply by this one.
        """
        return self.dequantize(dtype, rows)

    def group_scales(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # [r] int8 or [r, groups]
        """The scales of ``rows`` as fp32 (4-bit formats store fp16; NF4 overrides this to undo double quantization)."""
        return self.scales[rows].float()

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, config: QuantConfig | None = None) -> QuantizedLinearBase:
        """Quantize ``linear`` (an ``nn.Linear``) with ``config.method``, which must be a per-weight method."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        config = config if config is not None else QuantConfig(cls.quant_format)
        method = get_method(config.method)
        if method.weight is None:
            raise ValueError(
                f"method {config.method!r} quantizes whole models; call llmspeed.quantize(model, ..., "
                f"method={config.method!r}, calibration=...) instead of from_linear"
            )
        weight = rotate(linear.weight.detach(), rotation_group(config)) if config.hadamard else linear.weight
        qw = method.weight(weight, config)
        bias = None if linear.bias is None else linear.bias.detach()
        module = cls.from_codes(
            qw.codes, qw.scales, qw.zeros, config=config, bias=bias, in_features=linear.in_features
        )
        return module.to(linear.weight.device)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        *,
        config: QuantConfig,
        bias: torch.Tensor | None = None,
        in_features: int | None = None,
    ) -> QuantizedLinearBase:
        """Build the module from unpacked codes/scales/zeros in the layouts of :mod:`~llmspeed.quant.primitives`."""
        raise NotImplementedError

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have {self.in_features} features in its last axis; got {tuple(x.shape)}"
            )
        if torch.is_autocast_enabled(x.device.type):  # autocast skips custom kernels: use its dtype, as nn.Linear
            x = x.to(torch.get_autocast_dtype(x.device.type))  # (QLoRA: bf16 compute over the 4-bit base)
        if self._permuted:  # GPTQ act-order: packed column j holds input column perm[j]
            x = x.index_select(-1, self.perm)  # [..., in]
        if self._rotated:  # the packed weight is rotate(W): rotate x the same way
            x = rotate(x, self.layout.group)  # [..., in]
        dtype = x.dtype
        if self._int8_activations:  # dynamic int8 activations; straight-through gradient
            if dtype != torch.float32 and x.device.type == "cpu":  # codes times d in fp32, as the integer kernels
                x = x.float()  # and the fused step see them (16 bits would round them); the kernel widens x anyway
            q = cpp_round(x)  # one C++ pass where it applies (contiguous fp32 on the CPU), else None
            q = P.quantize_activations(x) if q is None else q  # [..., in]
            x = q if not x.requires_grad else x + (q - x).detach()
        if x.requires_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x, self)
        else:
            y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if y.dtype == dtype else y.to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out], x's dtype
        # Decode calls this ~200 times per token on small layers: keep the Python work minimal.
        m = x.numel() // self.in_features
        key = (x.dtype, x.get_device(), rows_bucket(m))
        entry = self._kernels.get(key)
        if entry is None:
            kernel = select(self, x.reshape(-1, self.in_features))
            entry = self._kernels[key] = (kernel.bind(self), kernel.any_leading_dims)
        fn, any_dims = entry
        if any_dims or x.dim() == 2:
            return fn(x)
        return fn(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def set_activations(self, activations: str) -> None:
        """Switch this layer to ``activations`` (``QuantConfig.activations``) in place, validated first; the kernel
        choices are made again. Meant for a model no Generator has read yet (``llmspeed.load(..., activations=)``):
        a Generator's fused decode step keeps what it read when it was built."""
        config = dataclasses.replace(self.config, activations=activations)  # ValueError before any change
        self.config = config
        self._int8_activations = activations == "int8"
        self._kernels = {}  # the kernel choice may depend on the activations (cpp_panels)

    def kernel_state(self, name: str, build) -> object:
        """Tensors kernel ``name`` prepared from this module's buffers (built once per device, then cached)."""
        key = (name, self.qweight.device, self.qweight.data_ptr())
        state = self._kernel_state.get(key)
        if state is None:
            self._kernel_state = {key: build(self)}  # drop states of other devices/buffers
            state = self._kernel_state[key]
        return state

    def _apply(self, fn, recurse=True):
        # .to(device) moves every buffer, but .to(dtype) / .half() / .bfloat16() leave the quantization state
        # in the dtype its kernels read (fp16 4-bit scales, fp32 int8 scales): only the bias follows the cast
        self._kernels, self._kernel_state = {}, {}
        state = {id(b) for n, b in self._buffers.items() if n in _STATE and b is not None and b.is_floating_point()}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in state:
                return fn(t)
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)  # fn's device, t's dtype

        return super()._apply(keep_dtype, recurse)

    def __getstate__(self):
        # bound kernels close over this module's tensors: never carry them into a copy or a pickle
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_kernels": {}, "_kernel_state": {}}

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernels, self._kernel_state = {}, {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        g = "" if c.group_size is None else f", group_size={c.group_size}"
        dq = ", double_quant=True" if c.double_quant else ""
        dq += ", symmetric=True" if c.symmetric and c.format == "int4" else ""
        dq += ", act_order=True" if c.act_order else ""
        dq += ", hadamard=True" if c.hadamard else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={c.format}{g}{dq}, "
            f"method={c.method}, kernel={c.kernel}, bias={self.bias is not None}"
        )

    @property
    def config(self) -> QuantConfig:
        """How the weight is quantized; replacing it recomputes :attr:`layout`."""
        return self._config

    @config.setter
    def config(self, config: QuantConfig) -> None:
        self._config = config
        self.layout = QuantLayout.of(config, self.in_features, self.out_features)

    @property
    def in_padded(self) -> int:
        """Input channels including the zero padding up to a multiple of the group size."""
        return self.layout.in_padded
