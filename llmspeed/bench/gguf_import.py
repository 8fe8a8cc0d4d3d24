"""GGUF files run by llmspeed (``llmspeed.load("m.gguf")``) and by llama.cpp: the same file, so the same weights.

Per file: its 2-D tensor types and size, how long ``llmspeed.load`` takes and the bytes the loaded model holds, and for
both runtimes the perplexity of the same pydoc windows, the batch-1 decode step at a 128-token context, the step
with 8 sequences running and the prompt rate (the measurements and ratios of :mod:`.cpu_peers`, whose helpers this
reuses). The files: the embedded SmolLM2 file (llama.cpp's converter: ``Q4_1`` layers, a ``Q8_0`` tied embedding)
and llama.cpp's ``Q4_0`` and ``Q8_0`` of it (``llama_model_quantize``), and its ``Q4_K_M`` of a random-weight llama
whose widths the K-quants take (:data:`RANDOM`: SmolLM2's are not multiples of 256, so its K-quant files are other
types). Every tensor of these files loads packed: ``Q4_*`` as int4, ``Q8_0`` and ``Q6_K`` as int8 (group-wise where
the file's blocks each have their own scale); the "loaded as float" column says so or names what did not. Each file
runs twice: as loaded (float activations) and loaded with ``activations="int8"``, every quantized layer multiplying
int8 activation codes in blocks of 32 as llama.cpp's own dot products do (its ``Q8_0`` / ``Q8_1`` activations).
``rounds`` alternate the two runtimes; each number is the median over rounds, each ratio the median of the rounds'
ratios.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..memory import memory_footprint
from ..models.embedded import gguf_path
from ..quant import load
from ..quant.formats import gguf_read
from .cpu_peers import PROMPT_TOKENS, _llmspeed_rows, _medians, _ratios
from .llama_anchor import llama_cpp_missing, llama_rows_isolated, pydoc_ids, requantized

# file -> (llama.cpp type name, its llama_ftype value) of llama_model_quantize's output: of the embedded file, or of
# RANDOM's float export for K-quants (SmolLM2's 576 and 1536 are not multiples of 256: its K-quant files fall back to
# other types); None: the embedded file itself
FILES: dict[str, tuple[str, int] | None] = {"Q4_1": None, "Q4_0": ("Q4_0", 2), "Q8_0": ("Q8_0", 7),
                                            "Q4_K_M": ("Q4_K_M", 15)}  # fmt: skip
# a random-weight llama whose widths K-quants take, with SmolLM2's vocabulary (llama.cpp needs one in the file)
RANDOM: dict[str, Any] = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=49152)  # fmt: skip
# row -> (its file (a key of FILES), the activations it loads with: llmspeed.load(path, activations=...))
ROWS: dict[str, tuple[str, str | None]] = {
    "Q4_1": ("Q4_1", None),
    "Q4_1, int8 activations": ("Q4_1", "int8"),
    "Q4_0 (llama_model_quantize of the Q4_1 file)": ("Q4_0", None),
    "Q4_0, int8 activations": ("Q4_0", "int8"),
    "Q8_0 (llama_model_quantize of the Q4_1 file)": ("Q8_0", None),
    "Q8_0, int8 activations": ("Q8_0", "int8"),
    "Q4_K_M (random-weight llama, 1024 wide)": ("Q4_K_M", None),
    "Q4_K_M, int8 activations": ("Q4_K_M", "int8"),
}


def _random_float_file(folder: Path) -> Path:
    """:data:`RANDOM`'s model (seed 0) with SmolLM2's tokenizer, saved as an F32 GGUF in ``folder`` (once)."""
    from ..model import Model
    from ..models import tiny
    from ..models.embedded import smollm2
    from ..quant import save

    path = folder / "random-1024-f32.gguf"
    if not path.exists():
        save(Model(tiny("llama", seed=0, **RANDOM).hf, smollm2().tokenizer), path, format="gguf")
    return path


def _path(name: str, threads: int, folder: Path) -> Path:
    made = FILES[name]
    if made is None:
        return gguf_path()
    if name.startswith("Q4_K"):
        return requantized(*made, threads, _random_float_file(folder), "random-1024", folder)
    return requantized(*made, threads)


def _loaded(path: Path, activations: str | None = None) -> tuple[Any, float, str]:
    """``llmspeed.load(path, activations=activations)``, its wall seconds, and what it loaded as float (its warning,
    shortened)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(path, activations=activations)
    seconds = time.perf_counter() - start
    floats = [str(w.message).split(": ", 1)[1].split(" load as", 1)[0] for w in caught if "load as float32" in str(w.message)]
    return model, seconds, "; ".join(floats) or "none"


def run(model: str = "smollm2", quick: bool = False, progress: bool = True, rounds: int = 2) -> list[dict[str, Any]]:
    """The table described in the module docstring (``quick``: fewer steps and windows, one round)."""
    from tqdm.auto import tqdm

    missing = llama_cpp_missing()
    if missing:
        raise RuntimeError(missing)
    if model != "smollm2":
        raise ValueError(f"gguf_import runs the embedded SmolLM2 file and llama.cpp's requantizations; got {model!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int; got {rounds!r}")
    rounds = 1 if quick else rounds
    threads = torch.get_num_threads()
    steps, n_windows = (16, 2) if quick else (32, 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmspeed-gguf-import-") as tmp:
        work = Path(tmp)
        for name, (file, activations) in tqdm(ROWS.items(), disable=not progress, desc="gguf_import"):
            path = _path(file, threads, work)
            ours_model, load_s, floats = _loaded(path, activations)
            prompt = pydoc_ids(ours_model, PROMPT_TOKENS)
            windows = torch.tensor(pydoc_ids(ours_model, 256 * n_windows)).view(n_windows, 256)
            ours, theirs, ratios = [], [], []
            for _ in range(rounds):
                with torch.inference_mode():
                    ours.append(_llmspeed_rows(ours_model, prompt, windows, steps))
                theirs.append(llama_rows_isolated(path, prompt, windows, threads, steps))
                ratios.append(_ratios(ours[-1], theirs[-1], name))
            types = sorted({t.tensor_type.name for t in gguf_read.read(path)[1].values() if len(t.shape) == 2})
            mine, other = _medians(ours), _medians(theirs)
            row: dict[str, Any] = {
                "file": name,
                "2-D tensor types": ", ".join(types), "file MB": round(path.stat().st_size / 1e6, 1),
                "loaded as float": floats, "llmspeed load s": round(load_s, 1),
                "llmspeed MB": round(memory_footprint(ours_model)["total"] / 1e6, 1),
                "llmspeed perplexity": round(mine["perplexity"], 3), "llama.cpp perplexity": round(other["perplexity"], 3),
                "llmspeed decode ms": round(mine["decode ms"], 2), "llama.cpp decode ms": round(other["decode ms"], 2),
            }  # fmt: skip
            for key, value in _medians(ratios).items():
                if key != "against":
                    row[key] = round(value, 4 if key.startswith("ppl") else 2)
            row["rounds"] = rounds
            rows.append(row)
            del ours_model
    return rows

