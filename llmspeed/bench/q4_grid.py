"""int4 perplexity against llama.cpp's Q4_0 on the embedded SmolLM2 and on reorderings of it that compute the same function.

The embedded SmolLM2 is a Q4_1 GGUF: every linear layer's weights already lie on a 4-bit grid, one scale and
one minimum per block of 32 input columns. A quantizer whose blocks are those same 32 columns (llama.cpp's
Q4_0, or any group size of 32) re-rounds values that sit on a coarser grid of its own block and keeps much of
it; a group of 64 spans two source blocks with two grids and keeps less. So on this model a format's
perplexity depends on its block boundaries as much as on its rounding, and the int4 rows of
:mod:`llmspeed.bench.cpu_peers` compare Q4_0's aligned blocks with llmspeed's g64 ones.

This suite removes that alignment without changing the model: a permutation of the residual stream's 576
channels, of each MLP's 1536 hidden units and of the 64 dimensions of each value head (the same reordering for
the query heads that read it) computes exactly the same function, but the columns of every linear layer are
reordered, so no 32-column block of any quantizer holds one source block. Each seed's permutation is applied
twice: to the GGUF (dequantized to F32 and written again; llama.cpp's own ``llama_model_quantize`` then makes
its Q4_0) and to llmspeed's model in memory. Both systems score the same pydoc windows, so each row shows
whether the float models agree (they must, to the last digits) and how the two int4 formats compare when the
weights favour neither. llama.cpp scores each file in a child process, retried without its extra buffer types
if a native build's AMX path crashes (:func:`~llmspeed.bench.llama_anchor.llama_perplexity_isolated`).
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..eval.perplexity import window_losses
from ..machine import cache_root, private_dir
from ..models.embedded import gguf_path, smollm2
from ..quant import quantize
from .llama_anchor import llama_cpp_missing, llama_perplexity_isolated, pydoc_ids, requantized

# (GGUF name in a block, HF parameter in a layer, permutation of dim 0, of dim 1): "res" the residual
# channels, "mlp" the layer's MLP hidden units, "kv" the value heads' dims, "q" the same for the query heads
LAYER_TENSORS = [
    ("attn_norm.weight", "input_layernorm.weight", "res", None),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "res", None),
    ("attn_q.weight", "self_attn.q_proj.weight", None, "res"),
    ("attn_k.weight", "self_attn.k_proj.weight", None, "res"),
    ("attn_v.weight", "self_attn.v_proj.weight", "kv", "res"),
    ("attn_output.weight", "self_attn.o_proj.weight", "res", "q"),
    ("ffn_gate.weight", "mlp.gate_proj.weight", "mlp", "res"),
    ("ffn_up.weight", "mlp.up_proj.weight", "mlp", "res"),
    ("ffn_down.weight", "mlp.down_proj.weight", "res", "mlp"),
]  # fmt: skip
MODEL_TENSORS = [("token_embd.weight", "model.embed_tokens.weight", None, "res"),
                 ("output.weight", "lm_head.weight", None, "res"),  # absent when tied to the embedding
                 ("output_norm.weight", "model.norm.weight", "res", None)]  # fmt: skip
SEEDS = tuple(range(1, 13))  # reorderings of the default run (25 s each); seed 0 is the embedded model as it is
WINDOWS = 8  # pydoc evaluation windows of 256 tokens, as cpu_peers scores them


def permutations(config: Any, seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The reorderings of ``seed``: the residual channels [hidden], and per layer ``mlp`` [intermediate],
    ``kv`` [kv heads * head dim] and ``q`` [heads * head dim] (each query head takes its value head's order)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or hidden // heads
    layers = []
    for _ in range(config.num_hidden_layers):
        within = [torch.randperm(dim, generator=gen) for _ in range(kv_heads)]  # per value head
        kv = torch.cat([h * dim + p for h, p in enumerate(within)])  # [kv_heads * dim]
        q = torch.cat([j * dim + within[j // (heads // kv_heads)] for j in range(heads)])  # [heads * dim]
        layers.append({"mlp": torch.randperm(config.intermediate_size, generator=gen), "kv": kv, "q": q})
    return torch.randperm(hidden, generator=gen), layers


def _reorder(t: torch.Tensor, dim0: torch.Tensor | None, dim1: torch.Tensor | None) -> torch.Tensor:
    if dim0 is not None:
        t = t.index_select(0, dim0)
    if dim1 is not None:
        t = t.index_select(1, dim1)
    return t


def _plan(config: Any, seed: int) -> dict[tuple[str, str], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(GGUF name, HF name) -> the index of each dimension, for every tensor the permutations move."""
    res, layers = permutations(config, seed)
    plan = {}
    for gguf_name, hf_name, d0, d1 in MODEL_TENSORS:
        plan[gguf_name, hf_name] = (res if d0 else None, res if d1 else None)
    for i, perms in enumerate(layers):
        both = {"res": res, **perms}
        for gguf_name, hf_name, d0, d1 in LAYER_TENSORS:
            plan[f"blk.{i}.{gguf_name}", f"model.layers.{i}.{hf_name}"] = (both[d0] if d0 else None, both[d1] if d1 else None)
    return plan


@torch.no_grad()
def permute_model(model: Any, seed: int) -> None:
    """Reorder ``model``'s (a Llama-family :class:`~llmspeed.model.Model`) weights in place by ``seed``'s
    permutations: the same function, other columns in each quantization block."""
    params = dict(model.module.named_parameters())  # a tied head is the embedding: listed, and moved, once
    plan = {hf: dims for (_, hf), dims in _plan(model.module.config, seed).items() if hf in params}
    if set(params) != set(plan):
        raise ValueError(f"permute_model reorders Llama-family weights without biases; these have no rule: "
                         f"{sorted(set(params) - set(plan))[:4]}")  # fmt: skip
    for name, (d0, d1) in plan.items():
        params[name].copy_(_reorder(params[name], d0, d1))


def write_permuted_gguf(config: Any, seed: int, out: Path, source: Path | None = None) -> Path:
    """Write the embedded GGUF (or ``source``) to ``out`` with every tensor dequantized to F32 and reordered
    by ``seed``'s permutations; returns ``out``."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source or gguf_path())
    writer = gguf.GGUFWriter(out, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    plan = {g: dims for (g, _), dims in _plan(config, seed).items()}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        d0, d1 = plan.get(t.name, (None, None))
        writer.add_tensor(t.name, _reorder(w, d0, d1).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _llama_ppls(seed: int, config: Any, windows: torch.Tensor, threads: int) -> dict[str, tuple[float, str | None]]:
    """llama.cpp's F32 and Q4_0 perplexity of seed's weights, each with the note of a crashed first try (a child
    process scores each file): the embedded GGUF requantized (seed 0, cached as cpu_peers caches it), or the
    reordered F32 GGUF and its Q4_0 in a temporary folder (1 GB a seed, not kept)."""
    if seed == 0:
        return {name: llama_perplexity_isolated(requantized(name, ftype, threads), windows, threads)
                for name, ftype in (("F32", 0), ("Q4_0", 2))}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=private_dir(cache_root() / "gguf")) as tmp:
        f32 = write_permuted_gguf(config, seed, Path(tmp) / "F32.gguf")
        q4 = requantized("Q4_0", 2, threads, source=f32, stem=f"reordered-{seed}", folder=Path(tmp))
        return {"F32": llama_perplexity_isolated(f32, windows, threads), "Q4_0": llama_perplexity_isolated(q4, windows, threads)}


def _ppl(model: Any, windows: torch.Tensor) -> float:
    text = model.tokenizer.decode(windows.flatten().tolist())
    with torch.inference_mode():
        return math.exp(window_losses(model, text, window=windows.shape[1], n_windows=windows.shape[0]).mean().item())


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True,
        seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One row per seed (0: the embedded model unchanged; default 0 and :data:`SEEDS`, 0 and 1 with ``quick``):
    the fp32 and int4 perplexity of llmspeed (RTN g64 as ``quantize(model, "int4", group_size=64)``, and g32,
    Q4_0's block size, at 5 bits a weight with fp16 scales and zeros) and of llama.cpp (F32, and the Q4_0 its
    ``llama_model_quantize`` makes of that F32 file) on the same windows; then the medians of the reordered rows."""
    if device != "cpu" or model != "smollm2":
        raise ValueError(f"q4_grid compares the embedded SmolLM2 on the CPU; got device={device!r}, model={model!r}")
    if seeds is None:
        seeds = (0, 1) if quick else (0, *SEEDS)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints >= 0 (0: the model unchanged); got {seeds!r}")
    missing = llama_cpp_missing()
    threads = torch.get_num_threads()
    n_windows = 2 if quick else WINDOWS
    rows = []
    for seed in tqdm(seeds, desc="q4_grid seeds", disable=not progress):
        base = smollm2()
        windows = torch.tensor(pydoc_ids(base, 256 * n_windows)).view(n_windows, 256)  # [n, 256]
        if seed:
            permute_model(base, seed)
        row: dict[str, Any] = {"weights": "embedded (Q4_1 blocks)" if seed == 0 else f"reordered, seed {seed}",
                               "llmspeed fp32 ppl": round(_ppl(base, windows), 3)}  # fmt: skip
        for group in (64, 32):
            q = quantize(copy.deepcopy(base), "int4", group_size=group)  # quantize works in place
            row[f"llmspeed int4 g{group} ppl"] = round(_ppl(q, windows), 3)
        if missing is not None:
            row["llama.cpp"] = f"skipped: {missing}"
        else:
            theirs = _llama_ppls(seed, base.module.config, windows, threads)
            row["llama.cpp F32 ppl"], row["llama.cpp Q4_0 ppl"] = round(theirs["F32"][0], 3), round(theirs["Q4_0"][0], 3)
            notes = {note for _, note in theirs.values() if note}
            if notes:
                row["llama.cpp"] = "; ".join(sorted(notes))
            row["int4 g64 / Q4_0"] = round(row["llmspeed int4 g64 ppl"] / row["llama.cpp Q4_0 ppl"], 4)
        rows.append(row)
    reordered = [r for r in rows if not r["weights"].startswith("embedded")]
    if len(reordered) > 1:
        keys = [k for k in reordered[0] if k != "weights" and not isinstance(reordered[0][k], str)]
        median = {k: round(statistics.median(r[k] for r in reordered), 4) for k in keys}
        rows.append({"weights": f"median of {len(reordered)} reorderings", **median})
        if "int4 g64 / Q4_0" in median:
            ratios = [r["int4 g64 / Q4_0"] for r in reordered]
            rows[-1]["int4 g64 / Q4_0, range"] = f"{min(ratios)} - {max(ratios)}"
    return rows
