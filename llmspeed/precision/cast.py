"""Cast a model to fp16/bf16 with fp32 where it matters, and autocast (mixed precision).

What stays in fp32 after :func:`cast` to a 16-bit dtype, and why:

* normalisation weights (RMSNorm/LayerNorm): the statistics are computed in fp32 by the models
  already; keeping the weight in fp32 avoids rounding it, and a hook rounds the norm's output
  once to the compute dtype so the next matmul sees 16-bit inputs (unless the activations are
  fp32, as in inference on CPUs without fast 16-bit GEMM: see below);
* rotary frequency tables (``inv_freq``): positions of several thousand times a bf16-rounded
  frequency drift by whole radians, so the tables are restored in fp32;
* logits: callers in llmspeed (perplexity, sampling) upcast logits to fp32 before softmax.

fp16 has a small range (max 65504). Activations that overflow turn into inf/NaN and a model
would silently produce garbage text; after a cast to fp16 a check on the final hidden states and one on
the logits (the output head alone can overflow) raise :class:`Fp16OverflowError`, which says which of the
two overflowed and suggests bf16 (same range as fp32).

On a CPU, the cast also lets the linear layers choose per call between the native 16-bit matmul and
an fp32 matmul over weight blocks converted on the fly, whichever :mod:`.cpu_matmul` measured to be
faster for that many rows here. Where the fp32 matmul wins from some number of rows on (a CPU without
fast 16-bit GEMM), inference computes in fp32 over the 16-bit weights and returns fp32 logits, as
llama.cpp does with F16 weights. Calls with fewer rows than the crossover (decode steps) still round
each linear layer's input to 16 bits for the native kernel, so fp16 can overflow there, as in training
(gradient mode keeps 16-bit activations) and on other devices: the overflow check stays on.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..model import as_model
from ..names import CANONICAL_DTYPES, DTYPE_ALIASES, dtype_name
from ..protocol import CausalLM, holds_step_lock, is_fake_quantized, is_quantized
from . import cpu_matmul as cpu_matmul_module

# every spelling cast accepts (llmspeed.names normalises them for every verb)
DTYPES: dict[str, torch.dtype] = {alias: CANONICAL_DTYPES[name] for alias, name in DTYPE_ALIASES.items()}
_HOOKS = "_llmspeed_precision_hooks"


class Fp16OverflowError(FloatingPointError):
    """Raised when fp16 activations overflow to inf/NaN."""


def resolve_dtype(dtype: str | torch.dtype, arg: str = "dtype") -> torch.dtype:
    """Map ``"bf16"``, ``"fp16"``, ``"fp32"`` (any spelling :func:`llmspeed.names.dtype_name` knows, or a torch dtype) to a torch dtype."""
    name = dtype_name(dtype)
    if isinstance(name, str) and name in CANONICAL_DTYPES:
        return CANONICAL_DTYPES[name]
    raise ValueError(f"{arg} must be one of {sorted(DTYPES)} or the matching torch dtype; got {dtype!r}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _remove_hooks(root: nn.Module) -> None:
    for handle in getattr(root, _HOOKS, []):
        handle.remove()
    setattr(root, _HOOKS, [])


def _round_output(dtype: torch.dtype):
    def hook(module, args, output):
        if not (torch.is_tensor(output) and output.is_floating_point()):
            return output
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.float32:
            return output  # fp32 activations (inference on the CPU, see cpu_matmul) stay fp32
        return output.to(dtype)

    return hook


def _check_finite(where: str):
    """A forward hook raising :class:`Fp16OverflowError` that names ``where`` when the module's output is not finite."""

    def hook(module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        if torch.is_tensor(hidden) and not torch.isfinite(hidden).all():
            raise Fp16OverflowError(
                f"fp16 activations overflowed to inf/NaN in this forward pass, in {where} (fp16 tops out at 65504); "
                f"cast with llmspeed.cast(model, 'bf16') instead: bf16 has the range of fp32"
            )

    return hook


def _base_model(root: nn.Module) -> nn.Module:
    base = getattr(root, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not root else root


CPU_MATMUL = ("auto", "native")


def _check_cpu_matmul(value: str) -> None:
    if value not in CPU_MATMUL:
        raise ValueError(f"cpu_matmul must be one of {list(CPU_MATMUL)}; got {value!r}")


def _layers(names: list[str]) -> str:
    """``"1 layer"`` / ``"15 layers"``: how many of the model's layers a refusal is about."""
    return "1 layer" if len(names) == 1 else f"{len(names)} layers"


@holds_step_lock
def cast(model: CausalLM, dtype: str | torch.dtype, *, cpu_matmul: str = "auto") -> CausalLM:
    """Cast ``model`` in place to ``dtype`` (``"fp32"``, ``"bf16"`` or ``"fp16"``) and return it.

    Norm weights and rotary tables stay in fp32 (see the module docstring). Casting back to fp32 gives fp32
    dtypes and plain fp32 forwards again; the weights keep their 16-bit rounding. LoRA adapters keep the dtype
    they were added with (fp32 by default), as an adapter added after the cast does. A quantized model cannot be cast: cast first, then quantize. A model prepared
    for quantization-aware training (:func:`llmspeed.qat.prepare`) can only be cast to fp32 (``ValueError``
    for 16 bits, which would round its fp32 grids): cast first, then prepare.

    Args:
        model: The model to cast.
        dtype: The target dtype.
        cpu_matmul: For a 16-bit cast of a model on the CPU. ``"auto"`` (default) lets each
            ``nn.Linear`` call use the native 16-bit matmul or :func:`~.cpu_matmul.upcast_linear`,
            whichever is faster for its number of rows on this CPU (:func:`~.cpu_matmul.crossover`).
            ``"native"`` always uses the native kernel.
    """
    model = as_model(model)  # a transformers model is wrapped (llmspeed.wrap) and cast in place
    target = resolve_dtype(dtype)
    _check_cpu_matmul(cpu_matmul)
    quantized = [name for name, module in model.linear_layers() if is_quantized(module)]
    if quantized:
        raise TypeError(
            f"model must not be quantized to be cast; {_layers(quantized)} {'is' if len(quantized) == 1 else 'are'} "
            f"(e.g. {quantized[0]}). "
            f"Cast before quantizing: llmspeed.cast(model, {dtype!r}) "
            f"then llmspeed.quantize(...)"
        )
    prepared = [name for name, m in model.linear_layers() if is_fake_quantized(m)]
    if prepared and target != torch.float32:
        raise ValueError(
            f"model is prepared for quantization-aware training ({_layers(prepared)}, e.g. {prepared[0]!r}); "
            f"a 16-bit cast would round the fp32 grids convert packs with. Cast before llmspeed.qat.prepare, "
            f"or keep fp32 master weights and train with llmspeed.finetune(..., precision='bf16')"
        )
    root = model.module
    rotary = {
        (name, buf_name): buf.detach().to(torch.float32).clone()
        for name, module in root.named_modules()
        for buf_name, buf in module.named_buffers(recurse=False)
        if "inv_freq" in buf_name
    }
    # LoRA adapters (lora_A / lora_B of a LoraLinear, found by those names: precision does not import lora)
    # keep the dtype they were added with, as an adapter added after the cast does
    adapters = [(m, next(m.parameters()).dtype) for module in root.modules() for d in _adapter_dicts(module)
                for m in d.values() if any(True for _ in m.parameters())]  # fmt: skip
    # the values of what keeps its dtype (adapters; norms on a 16-bit cast): root.to rounds them on the way, and
    # casting them back alone would keep the rounded values
    exact = {p: p.detach().clone() for module, _ in adapters for p in module.parameters()}
    if target != torch.float32:
        exact.update({p: p.detach().to(torch.float32, copy=True) for m in root.modules() if _is_norm(m) for p in m.parameters(recurse=False)})
    root.to(target)
    for module, kept in adapters:
        module.to(kept)
    for (name, buf_name), saved in rotary.items():
        setattr(root.get_submodule(name), buf_name, saved.to(getattr(root.get_submodule(name), buf_name).device))
    if target != torch.float32:
        for module in root.modules():
            if _is_norm(module):
                module.to(torch.float32)
    with torch.no_grad():
        for param, value in exact.items():
            param.copy_(value)
    attach(model, target, cpu_matmul=cpu_matmul)
    if getattr(root, "config", None) is not None:
        root.config.dtype = target
    return model


def _adapter_dicts(module: nn.Module) -> list[nn.ModuleDict]:
    """A LoRA wrapper's ``lora_A`` and ``lora_B`` (PEFT's layout, llmspeed.lora's too); none for other modules."""
    dicts = [getattr(module, key, None) for key in ("lora_A", "lora_B")]
    return [d for d in dicts if isinstance(d, nn.ModuleDict)]


def attach(model: CausalLM, dtype: str | torch.dtype, *, cpu_matmul: str = "auto") -> CausalLM:
    """Register what a model cast to ``dtype`` needs at run time, changing no tensor; return the model.

    That is the rounding of the norms' fp32 outputs to ``dtype``, the fp16 overflow check and, on the
    CPU, the per-call 16-bit matmul choice (see :func:`cast` for ``cpu_matmul``). Hooks from an earlier
    call are replaced. :func:`cast` ends with it; :func:`llmspeed.load` calls it for a model saved in
    16 bits, whose tensors come back as they were saved (norms in fp32) but whose hooks do not.
    A transformers model is wrapped first, as :func:`cast` does.
    """
    model = as_model(model)
    target = resolve_dtype(dtype)
    _check_cpu_matmul(cpu_matmul)
    root = model.module
    _remove_hooks(root)
    hooks = []
    if target != torch.float32:
        hooks = [m.register_forward_hook(_round_output(target)) for m in root.modules() if _is_norm(m)]
    if target == torch.float16:
        base = _base_model(root)
        names = {id(m): n for n, m in root.named_modules()}
        hooks.append(base.register_forward_hook(_check_finite(f"the final hidden states ({names[id(base)] or 'the model'})")))
        heads = getattr(root, "get_output_embeddings", None)  # transformers models have it; a bare module may not
        head = heads() if callable(heads) else None
        if isinstance(head, nn.Module) and head is not base:  # the logits overflow on their own: large head weights
            hooks.append(head.register_forward_hook(_check_finite(f"the logits (the output head {names.get(id(head), 'lm_head')!r})")))
    setattr(root, _HOOKS, hooks)
    cpu_matmul_module.remove(root)
    if target != torch.float32 and cpu_matmul == "auto" and model.spec.device.type == "cpu":
        cpu_matmul_module.install(root)
    return model


class autocast(AbstractContextManager):  # noqa: N801 (a verb, used as ``with llmspeed.autocast(...)``)
    """Mixed precision for the forward passes inside the block; weights stay as they are.

    ``with llmspeed.autocast(model, "bf16") as m: ...``: matmuls run in ``dtype`` (``"bf16"`` or ``"fp16"``)
    through ``torch.autocast`` on the model's device type (CPU or CUDA); reductions and softmax stay in fp32.
    ``model`` is an :class:`llmspeed.Model` or a transformers causal LM (wrapped, as :func:`cast` does); the block
    receives the wrapper. Bad arguments raise at the call, before the block (``ValueError`` also for a dtype the
    model's device cannot autocast to); an ``autocast`` that is never entered changes nothing, and says so with a
    ``RuntimeWarning`` when it is discarded (as an un-awaited coroutine does), since calling it without ``with`` is
    an easy slip that would otherwise go unnoticed.
    """

    def __init__(self, model: CausalLM, dtype: str | torch.dtype = "bf16"):
        target = resolve_dtype(dtype)
        if target == torch.float32:
            raise ValueError("dtype must be a 16-bit type for autocast ('bf16' or 'fp16'); got fp32")
        self.model = as_model(model)
        device = self.model.spec.device
        try:  # torch.autocast checks the device type and dtype when built; entering it changes the state
            torch.autocast(device_type=device.type, dtype=target)
        except RuntimeError as error:  # a device without autocast, bf16 on a GPU without it
            raise ValueError(f"dtype={dtype_name(target)!r} cannot autocast the model on {device}: {error}") from None
        self.dtype = target
        self._torch: torch.autocast | None = None
        self._entered = False

    def __enter__(self) -> CausalLM:
        if self._torch is not None:
            raise RuntimeError("this llmspeed.autocast block is already active; call llmspeed.autocast() again to nest")
        self._entered = True
        self._torch = torch.autocast(device_type=self.model.spec.device.type, dtype=self.dtype)
        self._torch.__enter__()
        return self.model

    def __exit__(self, *exc) -> None:
        ctx, self._torch = self._torch, None
        if ctx is not None:
            ctx.__exit__(*exc)

    def __del__(self) -> None:
        if not getattr(self, "_entered", True):
            warnings.warn(f"llmspeed.autocast(model, {dtype_name(self.dtype)!r}) was never entered, so it changed "
                          f"nothing: use it as 'with llmspeed.autocast(model, ...) as m:'",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
