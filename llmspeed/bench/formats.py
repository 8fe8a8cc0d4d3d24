"""Checkpoint formats benchmark: round trips through compressed-tensors, GPTQ and AWQ, quantize-while-loading memory,
load time.

Tables (every row: ``table, case, value, unit, baseline, vs_baseline``):

* ``round trip``: llmspeed -> compressed-tensors -> ``transformers.from_pretrained``: max |logit difference|
  relative to the max |logit| of llmspeed's dequantized model (every quantized linear replaced by an
  ``nn.Linear`` holding ``dequantize()``; goal <= 1e-4), and of llmspeed's model running its own kernels,
  int8 and int4 g32/g64/g128 sym/asym; then the same folder -> ``llmspeed.load``: how many quantized
  layers dequantize bit-identical to the dense weights transformers decompressed. SmolLM2's 576-wide
  inputs hold no whole group of 128, which compressed-tensors needs, so g128 is refused there and
  measured on the tiny model.
* ``gptq``: a GPTQ folder in the published layout with act-order (:mod:`.gptq_folder`) -> ``llmspeed.load``:
  perplexity against the float model holding the dequantized weights (goal: equal); ``awq``: the same for an
  AutoAWQ GEMM folder (:mod:`.awq_folder`).
* ``quantize while loading``: peak resident memory of ``models.from_pretrained(..., quantize=...)``
  against loading fp32 and calling ``quantize`` (each in a fresh interpreter; goal <= 0.5x), and whether
  the packed tensors are the same bit for bit.
* ``load time``: median seconds of ``llmspeed.load`` of a saved int4 model in each format (goal < 2 s).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import torch

import llmspeed

from ..quant.modules import QuantizedLinearBase

ROUND_TRIPS = [("int8", None, None), ("int4", 32, True), ("int4", 32, False), ("int4", 64, True),
               ("int4", 64, False), ("int4", 128, True), ("int4", 128, False)]  # fmt: skip


def _row(table: str, case: str, value: float, unit: str, baseline: str, base: float | None) -> dict:
    ratio = value / base if base else float("nan")
    return {
        "table": table,
        "case": case,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "vs_baseline": ratio,
    }


def _load_base(model: str):
    if model == "smollm2":
        return llmspeed.models.smollm2()
    if model.startswith("tiny"):
        return llmspeed.models.tiny(
            model.partition("-")[2] or "llama", hidden_size=128, intermediate_size=256
        )
    raise ValueError(f"model must be 'smollm2' or 'tiny-<arch>'; got {model!r}")


def _ids(base, n: int) -> torch.Tensor:  # [2, n]
    vocab = base.spec.vocab_size
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def _case(fmt: str, g: int | None, sym: bool | None) -> str:
    return "int8" if fmt == "int8" else f"int4 g{g} {'sym' if sym else 'asym'}"


def dequantized(model):
    """A float copy of ``model`` whose quantized linears are ``nn.Linear`` layers holding ``dequantize()``."""
    import copy

    from torch import nn

    hf = copy.deepcopy(model.hf)
    for (
        name,
        module,
    ) in model.linear_layers():  # positions from the original: wrap() finds only nn.Linear ones
        if isinstance(module, QuantizedLinearBase):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize()
            if module.bias is not None:
                linear.bias.data = module.bias.detach().clone()
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent) if parent else hf, child, linear)
    return llmspeed.wrap(hf, model.tokenizer)


def round_trips(model: str, quick: bool, work: Path) -> list[dict]:
    """llmspeed -> compressed-tensors -> transformers (logits) and -> llmspeed (weights)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    for fmt, g, sym in ROUND_TRIPS[:3] if quick else ROUND_TRIPS:
        case = _case(fmt, g, sym)
        base = _load_base(model)
        ids = _ids(base, 32)
        llmspeed.quantize(base, fmt, group_size=g, symmetric=sym, lm_head=None)  # the head the formats quantize: none
        with torch.no_grad():
            kernels = base.hf(input_ids=ids).logits
            want = dequantized(base).hf(input_ids=ids).logits
        folder = work / f"ct-{model}-{case.replace(' ', '-')}"
        try:
            llmspeed.save(base, folder, format="compressed-tensors")
        except ValueError as err:
            rows.append(
                _row(
                    "round trip",
                    f"{model} {case}: refused ({str(err)[:60]}...)",
                    float("nan"),
                    "-",
                    "-",
                    None,
                )
            )
            continue
        dense = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        with torch.no_grad():
            got = dense(input_ids=ids).logits
        for ref, logits in (("dequantized model", want), ("llmspeed kernels", kernels)):
            rel = ((got - logits).abs().max() / logits.abs().max()).item()
            rows.append(
                _row(
                    "round trip",
                    f"{model} {case} -> transformers vs {ref}",
                    rel,
                    "max abs dlogit / max abs logit",
                    "goal 1e-4",
                    1e-4,
                )  # fmt: skip
            )
        back = llmspeed.load(folder)
        layers = [(n, m) for n, m in back.linear_layers() if isinstance(m, QuantizedLinearBase)]
        same = sum(
            torch.equal(m.dequantize(), cast(torch.Tensor, dense.get_submodule(n).weight)) for n, m in layers
        )
        rows.append(
            _row(
                "round trip",
                f"{model} {case} -> llmspeed",
                same,
                f"of {len(layers)} layers bit-identical",
                "all",
                len(layers),
            )
        )
    return rows


def _nll(model, ids: torch.Tensor) -> float:
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits[:, :-1]  # [B, S-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).item()


def _foreign(table: str, label: str, base, folder: Path, dequantize, quick: bool) -> list[dict]:
    """Perplexity of ``folder`` (written from ``base``) loaded by ``llmspeed.load``, against ``base`` holding the
    weights the folder's tensors decode to (``dequantize(tensors, name)``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    for name, module in base.linear_layers():
        if f"{name}.qweight" in tensors:
            module.weight.data.copy_(dequantize(tensors, name))
    del tensors
    loaded = llmspeed.load(folder)
    if base.tokenizer is not None:
        n = 4 if quick else 16
        ref = llmspeed.eval.perplexity(base, n_windows=n, window=256)
        got = llmspeed.eval.perplexity(loaded, n_windows=n, window=256)
    else:
        ids = _ids(base, 64)
        ref, got = (float(torch.tensor(_nll(m, ids)).exp()) for m in (base, loaded))
    acts = sum(bool(getattr(m, "config", None) and m.config.act_order) for _, m in loaded.linear_layers())
    return [_row(table, "dequantized reference (float)", ref, "perplexity", "-", None),
            _row(table, label.format(acts=acts), got, "perplexity", "reference", ref)]  # fmt: skip


def gptq(model: str, quick: bool, work: Path) -> list[dict]:
    """A published-layout GPTQ folder with act-order -> llmspeed: perplexity against its dequantized reference."""
    from .gptq_folder import dequantize_layer, write_gptq_folder

    base = _load_base(model)
    folder = write_gptq_folder(base, work / "gptq", group=64, act_order=True, sym=False, version=1)
    return _foreign("gptq", "GPTQ v1 act-order g64 -> llmspeed ({acts} permuted layers)", base, folder,
                    lambda t, name: dequantize_layer(t, name, 1), quick)  # fmt: skip


def awq(model: str, quick: bool, work: Path) -> list[dict]:
    """An AutoAWQ (GEMM) folder -> llmspeed: perplexity against its dequantized reference."""
    from .awq_folder import dequantize_layer, write_awq_folder

    base = _load_base(model)
    folder = write_awq_folder(base, work / "awq", group=64)
    return _foreign("awq", "AWQ gemm g64 -> llmspeed", base, folder, dequantize_layer, quick)


_PEAK = """
import sys, torch, transformers, llmspeed
from transformers import AutoModelForCausalLM
import llmspeed.quant, llmspeed.models

def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

mode, path = sys.argv[1], sys.argv[2]
# what both ways pay before any weight: the tokenizer and the model classes built once on meta
transformers.AutoTokenizer.from_pretrained(path)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
print(peak_mib())  # the weight-free baseline
if mode == "fp32-then-quantize":
    m = llmspeed.wrap(__import__("transformers").AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    llmspeed.quantize(m, "int4", group_size=64)
else:
    m = llmspeed.models.from_pretrained(path, quantize=dict(format="int4", group_size=64))
print(peak_mib())
"""


def _peak_mib(mode: str, folder: Path) -> tuple[float, float]:
    """``(peak RSS, peak RSS above the weight-free baseline)`` in MiB, measured in a fresh interpreter.

    The baseline is the interpreter with torch, transformers and llmspeed imported, the tokenizer loaded
    and the architecture built once on ``meta``: what both ways of loading pay before any weight.
    """
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, mode, str(folder)], capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    imports, peak = (float(v) for v in done.stdout.strip().splitlines()[-2:])
    return peak, peak - imports


def _float_folder(model: str, work: Path) -> Path:
    if model == "smollm2":
        from ..models.embedded import _CACHE_NAME, cache_dir

        llmspeed.models.smollm2()  # converts the GGUF once if needed
        return cache_dir() / _CACHE_NAME
    folder = work / "float"
    _load_base(model).hf.save_pretrained(folder)
    return folder


def quantize_while_loading(model: str, work: Path) -> list[dict]:
    """Peak RSS of each way to an int4 g64 model (fresh interpreters) and whether the packed tensors agree."""
    folder = _float_folder(model, work)
    (base, base_w), (streamed, streamed_w) = (
        _peak_mib("fp32-then-quantize", folder),
        _peak_mib("while-loading", folder),
    )
    a = llmspeed.models.from_pretrained(folder, quantize=dict(format="int4", group_size=64))
    b = llmspeed.wrap(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    )
    llmspeed.quantize(b, "int4", group_size=64)
    sa, sb = a.hf.state_dict(), b.hf.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return [
        _row("quantize while loading", "load fp32, then quantize int4 g64", base, "MiB peak RSS", "-", None),
        _row(
            "quantize while loading",
            "from_pretrained(quantize=int4 g64)",
            streamed,
            "MiB peak RSS",
            "fp32 then quantize",
            base,
        ),
        _row(
            "quantize while loading",
            "load fp32, then quantize: above baseline",
            base_w,
            "MiB peak RSS - weight-free baseline",
            "-",
            None,
        ),
        _row(
            "quantize while loading",
            "from_pretrained(quantize): above baseline",
            streamed_w,
            "MiB peak RSS - weight-free baseline",
            "fp32 then quantize",
            base_w,
        ),  # fmt: skip
        _row("quantize while loading", "packed tensors bit for bit equal", float(same), "1 = yes", "-", None),
    ]


def load_times(model: str, quick: bool, work: Path) -> list[dict]:
    """Median seconds of ``llmspeed.load`` of an int4 g64 symmetric model saved in each format."""
    base = _load_base(model)
    llmspeed.quantize(base, "int4", group_size=64, symmetric=True)
    rows = []
    reps = 3 if quick else 5
    for fmt in ("llmspeed", "compressed-tensors"):
        folder = llmspeed.save(base, work / f"load-{fmt}", format=fmt)
        llmspeed.load(folder)  # warm: page cache, imports
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            llmspeed.load(folder)
            times.append(time.perf_counter() - start)
        rows.append(
            _row(
                "load time",
                f"llmspeed.load, {fmt} folder",
                statistics.median(times),
                "s (median)",
                "goal 2 s",
                2.0,
            )
        )
    return rows


def run(
    device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True
) -> list[dict]:
    """Every table of this suite (CPU only: the formats are device-independent files); ``progress``: a tqdm bar
    over the tables."""
    from tqdm.auto import tqdm

    if device != "cpu":
        raise ValueError(f"the formats suite runs on the CPU; got device={device!r}")
    with tempfile.TemporaryDirectory(prefix="llmspeed-formats-") as tmp:
        work = Path(tmp)
        tables = [lambda: round_trips(model, quick, work)]
        if model != "tiny-llama":  # every group size divides the tiny model's widths (g128 included)
            tables.append(lambda: round_trips("tiny-llama", quick, work))
        tables += [lambda: gptq(model, quick, work), lambda: awq(model, quick, work),
                   lambda: quantize_while_loading(model, work),
                   lambda: load_times(model, quick, work)]  # fmt: skip
        rows = []
        for table in tqdm(tables, disable=not progress, desc="formats"):
            rows += table()
    return rows


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(model=sys.argv[1] if len(sys.argv) > 1 else "smollm2", quick=True), indent=1))
