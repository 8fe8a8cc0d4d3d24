"""QAT suite: quantization-aware int4 training against post-training RTN and GPTQ of a fine-tuned model.

One table, ``qat/perplexity``; every row is trained with the same text (the pydoc ``"train"`` half),
steps, seed and recipe, and scored on two texts:

* ``ppl_domain``: the evaluation windows of the training domain (``pydoc_text("eval")``);
* ``ppl_license``: CPython's license (:func:`llmspeed.eval.license_text`), never trained or calibrated on.

Rows: the original fp32 model (context); the fp32 model fine-tuned in float (the baseline); RTN and GPTQ
int4 g64 of that fine-tuned model; QAT int4 g64, prepared from the *original* model (GPTQ start on the
same calibration windows), fine-tuned with the same recipe, then converted to the same packed
``Int4Linear`` modules, with learned scales and zero points (``learn_scales=True``). GPTQ and QAT run a
second time with every projection (q/k/v/o, gate/up/down) in a Hadamard-rotated basis (``hadamard_layers``);
the gaps closed are to GPTQ with its default settings. The fixed-grid
variant (``learn_scales=False``) is not rerun: only whole-code flips of the latent weights change that
model, and docs/qat.md records its measurement.
``seconds`` is each row's own cost (training, calibration, or both).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any

import torch

from ..eval import license_text, pydoc_text, window_losses
from .models import load_model

TABLE = "qat/perplexity"
# the GPTQ and QAT rows run once as they are and once with every projection's input in a Hadamard-rotated basis
# (quantize's and qat.prepare's ``hadamard_layers``; docs/qat.md, docs/calibration.md)
ROTATED: tuple[list[str] | None, ...] = (None, ["*_proj"])


def _rotated_label(rotated: list[str] | None) -> str:
    return ", hadamard *_proj" if rotated else ""


def settings(quick: bool, tiny: bool) -> dict[str, Any]:
    """The recipe: steps, tokens per step, learning rate, what trains, evaluation and calibration sizes."""
    common = dict(train="linears", precision="bf16", lr=1e-4, group_size=64, seed=0)
    if tiny:  # harness tests: seconds
        return {**common, "steps": 3, "seq_len": 32, "batch_size": 2, "window": 32, "domain_windows": 2,
                "license_windows": 2, "calib_sequences": 4, "calib_len": 32}  # fmt: skip
    if quick:  # a few minutes on 2 busy CPU cores
        return {**common, "steps": 6, "seq_len": 128, "batch_size": 2, "window": 256, "domain_windows": 2,
                "license_windows": 2, "calib_sequences": 8, "calib_len": 128}  # fmt: skip
    # sized for 2 CPU cores shared with other work (a 512-token bf16 step took 10-15 s there): the QAT
    # row (GPTQ start, 40 steps, convert) fits in 25 minutes with room to spare
    return {**common, "steps": 40, "seq_len": 128, "batch_size": 4, "window": 256, "domain_windows": 8,
            "license_windows": 8, "calib_sequences": 32, "calib_len": 128}  # fmt: skip


def _ppl(m, text: str | None, s: dict[str, Any], windows: int) -> float | None:
    if m.tokenizer is None:
        return None
    return math.exp(window_losses(m, text, window=s["window"], n_windows=windows).mean().item())


def _texts(m) -> Any:
    return None if m.tokenizer is not None else torch.randint(0, m.spec.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))


def _finetune(m, s: dict[str, Any], progress: bool):
    from ..trainer import finetune

    return finetune(
        m, _texts(m), steps=s["steps"], lr=s["lr"], seq_len=s["seq_len"], batch_size=s["batch_size"],
        train=s["train"], precision=s["precision"], seed=s["seed"], progress=progress,
    )  # fmt: skip


def _gptq_options(s: dict[str, Any], progress: bool) -> dict[str, Any]:
    return {"n_sequences": s["calib_sequences"], "seq_len": s["calib_len"], "progress": progress}


def run(*, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict]:
    """Run the QAT suite: one ``qat/perplexity`` row per model variant (see the module docstring)."""
    from .. import qat
    from ..quant import quantize

    s = settings(quick, model.startswith("tiny-"))
    original = load_model(model, device=device, progress=progress)
    rows: list[dict[str, Any]] = []

    def add(variant: str, m, seconds: float | None, final_loss: float | None = None) -> None:
        if progress:
            print(f"[qat] scoring {variant} ...", file=sys.stderr, flush=True)
        rows.append({
            "table": TABLE, "variant": variant, "baseline": "fp32 fine-tuned",
            "ppl_domain": _ppl(m, pydoc_text("eval") if m.tokenizer else None, s, s["domain_windows"]),
            "ppl_license": _ppl(m, license_text() if m.tokenizer else None, s, s["license_windows"]),
            "final_train_loss": final_loss, "seconds": seconds,
        })  # fmt: skip

    add("fp32 original (not fine-tuned)", original, None)
    tuned = copy.deepcopy(original)
    if progress:
        print(f"[qat] fine-tuning fp32 ({s['steps']} steps) ...", file=sys.stderr, flush=True)
    result = _finetune(tuned, s, progress)
    add("fp32 fine-tuned", tuned, result.seconds, sum(result.losses[-10:]) / len(result.losses[-10:]))

    rtn = copy.deepcopy(tuned)
    start = time.perf_counter()
    quantize(rtn, "int4", group_size=s["group_size"], lm_head=None)  # QAT's head stays float: the same here
    add(f"RTN int4 g{s['group_size']} of fine-tuned", rtn, time.perf_counter() - start)
    del rtn

    calibration = None if tuned.tokenizer is not None else _texts(tuned)
    for rotated in ROTATED:
        m = copy.deepcopy(tuned) if rotated is not ROTATED[-1] else tuned  # the last variant takes the model itself
        start = time.perf_counter()
        quantize(m, "int4", group_size=s["group_size"], method="gptq", calibration=calibration,
                 method_options=_gptq_options(s, progress), lm_head=None, hadamard_layers=rotated)  # fmt: skip
        add(f"GPTQ int4 g{s['group_size']}{_rotated_label(rotated)} of fine-tuned", m, time.perf_counter() - start)
        del m
    del tuned

    for rotated in ROTATED:
        m = copy.deepcopy(original) if rotated is not ROTATED[-1] else original
        if progress:
            print(f"[qat] preparing (GPTQ start, learned scales and zeros{_rotated_label(rotated)}) and fine-tuning ...",
                  file=sys.stderr, flush=True)  # fmt: skip
        start = time.perf_counter()
        qat.prepare(m, "int4", group_size=s["group_size"], init="gptq", learn_scales=True, hadamard_layers=rotated,
                    calibration=calibration, init_options=_gptq_options(s, progress))  # fmt: skip
        prepared = time.perf_counter() - start
        result = _finetune(m, s, progress)
        qat.convert(m)
        seconds = time.perf_counter() - start
        add(f"QAT int4 g{s['group_size']} (gptq start, learned scales+zeros{_rotated_label(rotated)}, converted)", m,
            seconds, sum(result.losses[-10:]) / len(result.losses[-10:]))  # fmt: skip
        rows[-1]["prepare_seconds"] = prepared
        del m

    base, gptq_row = rows[1], rows[3]  # the gaps are to GPTQ with its default settings
    for row in rows:
        for key in ("ppl_domain", "ppl_license"):
            if row[key] is not None and base[key]:
                row[f"{key}_vs_tuned_%"] = 100 * (row[key] / base[key] - 1)
    for row in rows[4:]:
        for key in ("ppl_domain", "ppl_license"):
            gap = None if gptq_row[key] is None else gptq_row[key] - base[key]
            if gap:
                row[f"{key}_gap_closed_%"] = 100 * (1 - (row[key] - base[key]) / gap)
    for row in rows:
        row.update({k: s[k] for k in ("steps", "seq_len", "batch_size", "lr", "train", "precision")})
    return rows
