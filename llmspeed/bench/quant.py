"""Quantization benchmark suite: perplexity, memory, kernel microbenchmarks and batch-1 greedy decode.

Every row has the keys ``table, case, value, unit, baseline, vs_baseline``; ``vs_baseline`` is the
ratio to the named baseline measured in the same run (perplexity and memory: value / baseline; times:
baseline time / time, i.e. a speedup).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import llmspeed

from ..precision import cpu_matmul
from ..quant import QuantConfig, module_class
from ..quant.kernels import KERNELS, auto_kernel
from ..quant.primitives import quantize_activations
from ..timing import copies_to_defeat_cache, timeit, timeit_cuda_graph

FORMATS = [("int8", {}), ("int4 g64", {"fmt": "int4", "group_size": 64}), ("int4 g128", {"fmt": "int4", "group_size": 128}),
           ("nf4 g64", {"fmt": "nf4", "group_size": 64}), ("nf4 g128", {"fmt": "nf4", "group_size": 128}),
           ("nf4 g64 dq", {"fmt": "nf4", "group_size": 64, "double_quant": True})]  # fmt: skip
DECODE_FORMATS = ["int8", "int4 g64", "nf4 g64"]


def _row(
    table: str, case: str, value: float, unit: str, baseline: str, base_value: float, speed: bool = False
) -> dict:
    ratio = (base_value / value if speed else value / base_value) if value and base_value else float("nan")
    return {
        "table": table,
        "case": case,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "vs_baseline": ratio,
    }


def _load(model: str, device: str, dtype: torch.dtype = torch.float32):
    if model == "smollm2":
        return llmspeed.models.smollm2(dtype=dtype, device=device)
    if model in ("llama-1b-random", "llama1b"):
        return llmspeed.models.llama_1b_random(dtype=dtype, device=device)
    if model.startswith("tiny"):
        tiny = llmspeed.models.tiny(model.partition("-")[2] or "llama", dtype=dtype)
        tiny.hf.to(device)
        return tiny
    raise ValueError(f"model must be one of ['smollm2', 'llama-1b-random', 'tiny-<arch>']; got {model!r}")


def _quantized(base, name: str):
    model = llmspeed.wrap(copy.deepcopy(base.hf), base.tokenizer)
    kwargs = dict(FORMATS)[name]
    return llmspeed.quantize(model, **({"fmt": "int8"} | kwargs))


# --- perplexity and memory ------------------------------------------------------------------------
def perplexity_rows(base, quick: bool, progress: bool) -> list[dict]:
    """Perplexity on the pydoc evaluation windows: fp32 and every format."""
    n = 4 if quick else 16
    ref = llmspeed.eval.perplexity(base, n_windows=n)
    rows = [_row("perplexity", f"fp32 ({n} x 512 tokens)", ref, "ppl", "fp32", ref)]
    for name, _ in tqdm(FORMATS, disable=not progress, desc="perplexity"):
        ppl = llmspeed.eval.perplexity(_quantized(base, name), n_windows=n)
        rows.append(_row("perplexity", name, ppl, "ppl", "fp32", ref))
    return rows


def _head_bytes(model) -> int:
    """Bytes of the output head that ``memory_footprint`` counts under ``"linear"`` (0 for a float head tied to the
    input embedding, which it counts as the embedding)."""
    hf = model.hf
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or (weight is not None and weight is getattr(emb, "weight", None)):
        return 0
    return sum(t.numel() * t.element_size() for t in head.state_dict().values())


def memory_rows(base) -> list[dict]:
    """Whole-model bytes, and the decoder's linear layers' bytes (the output head left out: quantize stores it at
    int8 by default, and a tied float head is counted as the embedding), vs fp32."""
    ref = llmspeed.memory_footprint(base)
    rows = [_row("memory", "fp32 whole model", ref["total"] / 2**20, "MiB", "fp32", ref["total"] / 2**20)]
    for name, _ in FORMATS:
        q = _quantized(base, name)
        fp = llmspeed.memory_footprint(q)
        rows.append(
            _row("memory", f"{name} whole model", fp["total"] / 2**20, "MiB", "fp32", ref["total"] / 2**20)
        )
        lin, ref_lin = fp["linear"] - _head_bytes(q), ref["linear"] - _head_bytes(base)
        rows.append(
            _row("memory", f"{name} linear layers", lin / 2**20, "MiB", "fp32 linear", ref_lin / 2**20)
        )
    return rows


# --- kernel microbenchmark ------------------------------------------------------------------------
def _time(fn: Callable, device: str, quick: bool) -> float:
    with torch.no_grad():
        t = timeit(fn, repeats=3, warmup=1, inner=1, device=device)
        if t.median > 0.25:  # a slow path (aten CPU kernels at prefill M): its median of 3 is enough
            return t.median
        inner = max(1, min(200, int(0.02 / max(t.median, 1e-7))))
        return timeit(fn, repeats=5 if quick else 9, warmup=0, inner=inner, device=device).median


def kernel_rows(
    device: str, shapes: list[tuple[int, int]], rows_m: list[int], quick: bool, progress: bool
) -> list[dict]:
    """Each format x kernel path vs fp32 and bf16 at each M (same weights, same run).

    The bf16 baseline is what a layer of a bf16-cast model runs: on a CPU from the measured crossover
    on (:func:`llmspeed.precision.cpu_matmul.crossover`), fp32 GEMMs over converted weight blocks, timed
    in a row of its own next to the native ``F.linear``.
    """
    out = []
    jobs = [(k, n, m) for (k, n) in shapes for m in rows_m]
    for k, n, m in tqdm(jobs, disable=not progress, desc="kernels"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=device).requires_grad_(False)
        x = torch.randn(m, k, device=device)
        shape = f"{k}x{n} M={m}"
        fp32 = _time(lambda x=x, w=lin.weight: F.linear(x, w), device, quick)
        wb, xb = lin.weight.bfloat16(), x.bfloat16()
        bf16 = _time(lambda xb=xb, wb=wb: F.linear(xb, wb), device, quick)
        out.append(
            _row("kernels", f"{shape} fp32 F.linear", fp32 * 1e6, "us", "fp32", fp32 * 1e6, speed=True)
        )
        out.append(
            _row("kernels", f"{shape} bf16 F.linear", bf16 * 1e6, "us", "fp32", fp32 * 1e6, speed=True)
        )
        bf16_base = "bf16 F.linear"
        if cpu_matmul.uses_upcast(xb, wb):  # a layer of a bf16-cast model runs this path instead
            bf16 = _time(lambda xb=xb, wb=wb: cpu_matmul.upcast_linear(xb, wb), device, quick)
            bf16_base = "bf16 cast layer"
            out.append(
                _row("kernels", f"{shape} {bf16_base} (fp32 blocks)", bf16 * 1e6, "us", "fp32", fp32 * 1e6, speed=True)
            )
        for fmt, acts in (("int8", "float"), ("int8", "int8"), ("int4", "float"), ("int4", "int8"), ("nf4", "float")):
            module = module_class(fmt).from_linear(lin, QuantConfig(fmt, activations=acts))
            label = fmt if acts == "float" else f"{fmt} int8-activations"
            inputs = ((x, "fp32"), (xb, "bf16"))
            if acts == "int8":  # what such a layer passes its kernel: its input rounded to the int8 grid
                inputs = ((quantize_activations(x), "fp32"), (quantize_activations(x.bfloat16()), "bf16"))
            for xin, dname in inputs:
                auto = auto_kernel(module, xin).name
                for name, kernel in KERNELS.items():
                    if name == "reference" or kernel.why_not(module, xin) is not None:
                        continue
                    mark = " (auto)" if name == auto else ""
                    try:
                        t = _time(
                            lambda kernel=kernel, xin=xin, module=module: kernel.run(module, xin),
                            device,
                            quick,
                        )
                    except (
                        RuntimeError,
                        NotImplementedError,
                    ) as err:  # an aten op without this device's code
                        mark, t = f" failed: {str(err).splitlines()[0][:60]}", float("nan")
                    base, bt = ("fp32 F.linear", fp32) if dname == "fp32" else (bf16_base, bf16)
                    out.append(
                        _row(
                            "kernels",
                            f"{shape} {label} {dname} {name}{mark}",
                            t * 1e6,
                            "us",
                            base,
                            bt * 1e6,
                            speed=True,
                        )
                    )
    return out


def graph_kernel_rows(device: str, k: int = 4096, n: int = 14336, rows_m: tuple[int, ...] = (1, 4, 16, 64, 256)) -> list[dict]:
    """CUDA only: device time per call inside a CUDA graph, each path vs bf16 ``F.linear``, L2 defeated.

    Eager timing at M=1 measures Python dispatch as much as the kernel (a 4096x14336 int4 weight is
    29 MB, read in ~10 us at 3 TB/s); the generator's decode steps replay CUDA graphs, so this is the
    time a decode step pays per layer. Operands rotate over enough copies to exceed twice the L2. ``rows_m`` reaches
    the decode batches of a busy server (64, 256), where the tile matmul (``triton_mm``) competes.
    """
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    out = []
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    for m in rows_m:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        shape = f"{k}x{n} M={m}"
        weights = [lin.weight.clone() for _ in range(copies_to_defeat_cache(lin.weight.nbytes, l2))]
        with torch.no_grad():
            bf16 = timeit_cuda_graph([partial(F.linear, x, w) for w in weights]).median
        out.append(_row("kernels", f"{shape} bf16 F.linear (CUDA graph)", bf16 * 1e6, "us", "bf16", bf16 * 1e6, speed=True))
        for fmt in ("int8", "int4", "nf4"):
            first = module_class(fmt).from_linear(lin, QuantConfig(fmt))
            nbytes = sum(t.nbytes for t in first.buffers())
            modules = [first] + [copy.deepcopy(first) for _ in range(copies_to_defeat_cache(nbytes, l2) - 1)]
            for name, kernel in KERNELS.items():
                if name == "reference" or kernel.why_not(first, x) is not None:
                    continue
                try:
                    with torch.no_grad():
                        t = timeit_cuda_graph([partial(kernel.run, mod, x) for mod in modules]).median
                    label = f"{shape} {fmt} bf16 {name} (CUDA graph)"
                except Exception as err:  # noqa: BLE001 - a path that cannot be captured is reported, not fatal
                    t, label = float("nan"), f"{shape} {fmt} bf16 {name} (CUDA graph) failed: {str(err).splitlines()[0][:60]}"
                out.append(_row("kernels", label, t * 1e6, "us", "bf16 F.linear (CUDA graph)", bf16 * 1e6, speed=True))
    return out


# --- end-to-end decode ----------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Batch-1 greedy decoding with transformers' KV cache; returns (decode tokens/s, tokens)."""
    hf = model.hf
    out = hf(input_ids=prompt[None], use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    tokens = [int(token)]
    cache = out.cache
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = hf(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    elapsed = time.perf_counter() - start
    return (new_tokens - 1) / elapsed, tokens


def decode_rows(base, device: str, quick: bool, progress: bool, dtype_name: str) -> list[dict]:
    """Tokens/s of the same greedy loop for the float model and each decode format (median of runs)."""
    prompt = torch.arange(100, 132, device=device)  # [32]
    new, runs = (24, 3) if quick else (64, 5)

    def measure(model):
        greedy_decode(model, prompt, 4)  # warm-up (kernel choice, caches)
        results = [greedy_decode(model, prompt, new) for _ in range(runs)]
        return sorted(r[0] for r in results)[runs // 2], results[0][1]

    ref, ref_tokens = measure(base)
    rows = [_row("decode", f"{dtype_name} batch-1 greedy", ref, "tok/s", dtype_name, ref, speed=False)]
    for name in tqdm(DECODE_FORMATS, disable=not progress, desc="decode"):
        tps, tokens = measure(_quantized(base, name))
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        rows.append(
            _row(
                "decode",
                f"{name} ({same}/{len(tokens)} tokens as {dtype_name})",
                tps,
                "tok/s",
                dtype_name,
                ref,
            )
        )
    return rows


TABLES = ("perplexity", "memory", "kernels", "decode")


def run(
    *, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True,
    tables: Sequence[str] | None = None,
) -> list[dict]:
    """The ``tables`` (default: all four, perplexity and memory only for smollm2 on the CPU, the one setting they
    are measured in; asked for elsewhere, they are refused). On CUDA the float baseline is bf16 and the
    microbenchmark adds 4096x14336."""
    asked = TABLES if tables is None else tuple(tables)
    unknown = sorted(set(asked) - set(TABLES))
    if unknown:
        raise ValueError(f"tables must be among {list(TABLES)}; got {unknown}")
    smollm2_cpu = model == "smollm2" and device == "cpu"
    if tables is not None and not smollm2_cpu and {"perplexity", "memory"} & set(asked):
        raise ValueError(f"tables perplexity and memory are measured for model='smollm2' on device='cpu' only; "
                         f"got tables={list(asked)} with model={model!r}, device={device!r}")  # fmt: skip
    tables = asked
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dtype_name = "fp32" if dtype == torch.float32 else "bf16"
    base = _load(model, device, dtype)
    rows = []
    if smollm2_cpu:
        rows += perplexity_rows(base, quick, progress) if "perplexity" in tables else []
        rows += memory_rows(base) if "memory" in tables else []
    spec = base.spec
    shapes = [(spec.hidden_size, 1536 if model == "smollm2" else spec.hidden_size * 4)]
    shapes += [(4096, 4096)] if device == "cpu" else [(4096, 14336)]
    if not quick:
        shapes.insert(1, (1536 if model == "smollm2" else spec.hidden_size * 4, spec.hidden_size))
    prefill = 256 if quick and device == "cpu" else 512
    if "kernels" in tables:
        rows += kernel_rows(device, shapes, [1, 4, 16, 64, prefill], quick, progress)
        if torch.device(device).type == "cuda":
            rows += graph_kernel_rows(device)
    if "decode" in tables:
        rows += decode_rows(base, device, quick, progress, dtype_name)
    return rows
