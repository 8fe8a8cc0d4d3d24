"""Write the example notebooks (``examples/*.ipynb``) from the cells below: ``python examples/make_notebooks.py``.

The notebooks are generated, not edited by hand, so they stay reviewable as Python. They use only
llmspeed's public API (plus torch, transformers and matplotlib). Each reads ``LLMSPEED_EXAMPLES_QUICK``
(set by ``tests/test_notebooks.py``, and by ``tests/test_docs_examples.py`` for the docs' code blocks):
when it is ``1`` the sizes shrink so that all notebooks run in a few minutes on 2 CPU cores; the
default sizes give the numbers worth reading.

``python examples/make_notebooks.py --execute`` also runs each notebook at its default sizes and writes
it with its outputs (the committed notebooks are executed; their first cell prints the machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """\
import math
import os
import platform
import time

import torch
from IPython.display import Markdown, display

import llmspeed

QUICK = os.environ.get("LLMSPEED_EXAMPLES_QUICK") == "1"  # set by the test suite: small sizes
torch.manual_seed(0)


def show(rows):
    \"\"\"A list of dicts as a markdown table (floats to 4 significant digits).\"\"\"
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    display(Markdown("\\n".join(lines)))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# the machine these outputs come from
print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
      f"llmspeed {llmspeed.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; quick={QUICK}")


# perplexity text: the evaluation half of Python's docs (a prefix in quick mode: tokenizing all of it takes seconds)
TEXT = llmspeed.eval.pydoc_text("eval")[:40_000] if QUICK else None"""

PRECISION = [
    new_markdown_cell(
        "# Precision: fp32, bf16, fp16 and autocast on SmolLM2\n\n"
        "`llmspeed.cast(model, dtype)` casts weights to 16 bits and keeps in fp32 what must stay there "
        "(norm weights, rotary tables; logits are upcast before softmax). `llmspeed.autocast` keeps fp32 "
        "weights and runs matmuls in 16 bits. Here we measure memory, perplexity and speed on the embedded "
        "SmolLM2-135M, then look at raw matmul speed per dtype on this machine."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "WINDOWS, WINDOW = (1, 128) if QUICK else (4, 512)\n"
        "rows = []\n"
        "for dtype in ['fp32', 'bf16', 'fp16']:\n"
        "    model = llmspeed.cast(llmspeed.models.smollm2(), dtype)\n"
        "    mem = llmspeed.memory_footprint(model)\n"
        "    start = time.perf_counter()\n"
        "    ppl = llmspeed.eval.perplexity(model, TEXT, window=WINDOW, n_windows=WINDOWS, batch_size=1)\n"
        "    rows.append({'dtype': dtype, 'weights_MB': mem['total'] / 1e6, 'perplexity': ppl,\n"
        "                 'eval_s': time.perf_counter() - start})\n"
        "base = rows[0]\n"
        "for r in rows:\n"
        "    r['memory_vs_fp32'] = r['weights_MB'] / base['weights_MB']\n"
        "    r['ppl_vs_fp32_%'] = 100 * (r['perplexity'] / base['perplexity'] - 1)\n"
        "show(rows)"
    ),
    new_markdown_cell(
        "Memory halves and perplexity moves by well under 1%. Speed depends on the CPU. Without native bf16 "
        "(this project's CI machine is AVX2-only), PyTorch's 16-bit matmuls cost about the same per row at "
        "any M, so prefill and perplexity would run several times slower than in fp32. So on the CPU, "
        "`llmspeed.cast` lets each linear layer choose per call. From a row count it measures once (M=4 on "
        "that machine), it converts the weight to fp32 in cache-sized blocks and runs the fp32 GEMM: the "
        "`bf16-upcast` rows below. At M=1 (decoding) a matmul is bound by reading the weights, and the native "
        "kernel, reading half the bytes, can win. On a CPU with native bf16 (AVX512-BF16 or AMX, such as a "
        "recent Xeon: see the machine line of the first cell) the native bf16 rows win at every M instead, "
        "and `llmspeed.cast` measures that and keeps the native kernel."
    ),
    new_code_cell(
        "import torch.nn.functional as F\n"
        "from llmspeed.precision.cpu_matmul import upcast_linear   # what a cast layer runs from its crossover M on\n"
        "\n"
        "def median_ms(fn, repeats=5):\n"
        "    fn()  # warm-up\n"
        "    times = []\n"
        "    for _ in range(repeats):\n"
        "        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)\n"
        "    return 1e3 * sorted(times)[len(times) // 2]\n"
        "\n"
        "shapes = [(1, 1024, 1024), (64, 1024, 1024)] if QUICK else [(m, 4096, 4096) for m in (1, 16, 256)]\n"
        "mm = []\n"
        "with torch.no_grad():\n"
        "    for m, k, n in shapes:\n"
        "        x32, w32 = torch.randn(m, k), torch.randn(n, k) / k**0.5\n"
        "        paths = {'fp32': lambda: F.linear(x32, w32)}\n"
        "        for name, dtype in [('bf16', torch.bfloat16), ('fp16', torch.float16)]:\n"
        "            x, w = x32.to(dtype), w32.to(dtype)\n"
        "            paths[name] = lambda x=x, w=w: F.linear(x, w)\n"
        "        xb, wb = x32.bfloat16(), w32.bfloat16()\n"
        "        paths['bf16-upcast'] = lambda: upcast_linear(xb, wb)\n"
        "        base = median_ms(paths['fp32'])\n"
        "        for name, fn in paths.items():\n"
        "            ms = base if name == 'fp32' else median_ms(fn)\n"
        "            mm.append({'M': m, 'K': k, 'N': n, 'dtype': name, 'ms': ms,\n"
        "                       'GFLOP/s': 2 * m * k * n / ms / 1e6, 'speedup_vs_fp32': base / ms})\n"
        "show(mm)"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(5, 3))\n"
        "for dtype in sorted({r['dtype'] for r in mm}):\n"
        "    pts = [(r['M'], r['GFLOP/s']) for r in mm if r['dtype'] == dtype]\n"
        "    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=dtype)\n"
        "ax.set_xscale('log', base=2); ax.set_xlabel('M (tokens)'); ax.set_ylabel('GFLOP/s'); ax.legend()\n"
        "ax.set_title('F.linear throughput per dtype on this machine'); plt.show()"
    ),
    new_markdown_cell(
        "**Autocast** keeps fp32 weights (no memory saved) and casts them per matmul: useful for training "
        "or on GPUs; on this CPU it only adds the cast. fp16 has a small range (max 65504): after "
        "`cast(model, 'fp16')` an overflow raises `Fp16OverflowError` suggesting bf16 instead of returning "
        "NaN text."
    ),
    new_code_cell(
        "model = llmspeed.models.smollm2()\n"
        "ids = model.tokenizer('Python decorators are', return_tensors='pt').input_ids\n"
        "with llmspeed.autocast(model, 'bf16'), torch.no_grad():\n"
        "    logits = model.hf(input_ids=ids).logits\n"
        "print(logits.dtype, model.spec.dtype)   # bf16 activations, fp32 weights"
    ),
]

QUANTIZATION = [
    new_markdown_cell(
        "# Post-training quantization: int8, int4, NF4\n\n"
        "`llmspeed.quantize(model, fmt)` replaces linear layers with packed quantized modules in place. "
        "Which matmul path runs is chosen per device, dtype and number of rows M by `kernel='auto'`; "
        "`llmspeed.kernels()` shows what exists on this machine and what is picked."
    ),
    new_code_cell(SETUP),
    new_code_cell("report = llmspeed.kernels()\nprint(report)"),
    new_markdown_cell(
        "Now each format on a fresh SmolLM2: memory of the whole model, of its linear layers and of its embedding, "
        "perplexity on the pydoc text, and batch-1 decode speed through the batching generator."
    ),
    new_code_cell(
        "from llmspeed import SamplingParams\n"
        "WINDOWS, WINDOW, NEW = (1, 128, 8) if QUICK else (4, 512, 32)\n"
        "configs = [('fp32', None), ('int8', {}), ('int4', {'group_size': 64}), ('int4', {'group_size': 128}),\n"
        "           ('nf4', {'group_size': 64, 'double_quant': True})]\n"
        "if QUICK:\n"
        "    configs = configs[:3]\n"
        "rows = []\n"
        "for fmt, opts in configs:\n"
        "    model = llmspeed.models.smollm2()\n"
        "    if opts is not None:\n"
        "        llmspeed.quantize(model, fmt, **opts)\n"
        "    mem = llmspeed.memory_footprint(model)\n"
        "    ppl = llmspeed.eval.perplexity(model, TEXT, window=WINDOW, n_windows=WINDOWS, batch_size=1)\n"
        "    out = model.generate_batched(['The import statement'], SamplingParams(max_new_tokens=NEW, ignore_eos=True),\n"
        "                                 progress=False)[0]\n"
        "    label = fmt + (f\" g{opts['group_size']}\" if opts and 'group_size' in opts else '')\n"
        "    rows.append({'format': label, 'total_MB': mem['total'] / 1e6, 'linear_MB': mem['linear'] / 1e6,\n"
        "                 'embedding_MB': mem['embedding'] / 1e6,\n"
        "                 'perplexity': ppl, 'decode_ms/token': 1e3 * out.metrics.inter_token_latency})\n"
        "base = rows[0]\n"
        "for r in rows:\n"
        "    r['total_vs_fp32'] = r['total_MB'] / base['total_MB']\n"
        "    r['ppl_vs_fp32_%'] = 100 * (r['perplexity'] / base['perplexity'] - 1)\n"
        "show(rows)"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "fig, axes = plt.subplots(1, 3, figsize=(12, 3))\n"
        "labels = [r['format'] for r in rows]\n"
        "for ax, key, unit in zip(axes, ['total_MB', 'ppl_vs_fp32_%', 'decode_ms/token'],\n"
        "                         ['MB (whole model)', 'perplexity change vs fp32 (%)', 'ms per decoded token']):\n"
        "    ax.barh(labels, [r[key] for r in rows]); ax.set_title(key); ax.set_xlabel(unit); ax.invert_yaxis()\n"
        "plt.tight_layout(); plt.show()"
    ),
    new_markdown_cell(
        "Reading the table: memory shrinks as promised. In fp32 the output head is the 28M-parameter embedding "
        "matrix (tied), counted once under `embedding_MB`. `quantize` stores that head at int8 in every format "
        "(`lm_head='int8'`, the default; `lm_head=None` keeps it in float), counted under `linear_MB`, and the "
        "embedding reads its rows from it (`embedding_MB` 0): so `linear_MB` of the fp32 row and of the quantized "
        "rows cover different weights, and `total_vs_fp32` is the ratio to compare. Speed only follows when a kernel reads the packed "
        "weights directly; where the fastest path is dequantize-then-matmul, the theoretical win does not "
        "appear. See the kernel-support page of the docs for measured numbers per path and M.\n\n"
        "Quantized models save to safetensors files and load back bit-exactly:"
    ),
    new_code_cell(
        "import tempfile\n"
        "# the last model of the table above\n"
        "with tempfile.TemporaryDirectory() as folder:\n"
        "    llmspeed.save(model, folder)\n"
        "    again = llmspeed.load(folder)\n"
        "ids = model.tokenizer('def main():', return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    same = torch.equal(model.hf(input_ids=ids).logits, again.hf(input_ids=ids).logits)\n"
        "print('identical logits after save/load:', same)"
    ),
]

QLORA = [
    new_markdown_cell(
        "# QLoRA: fine-tune adapters over a frozen int4 SmolLM2\n\n"
        "The base stays packed in 4 bits; small low-rank adapters train in fp32 through it. We train on the "
        "*train* half of the pydoc text and measure held-out loss on windows it never saw."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "from llmspeed import lora\n"
        "STEPS, SEQ, BATCH, EVAL = (2, 32, 1, 1) if QUICK else (30, 128, 2, 4)   # full: a few minutes on 2 cores\n"
        "model = llmspeed.quantize(llmspeed.models.smollm2(), 'int4', group_size=64)\n"
        "packed_before = {n: b.clone() for n, b in model.hf.named_buffers() if b.dtype == torch.uint8}\n"
        "lora.add_adapter(model, 'pydoc', r=16, alpha=32, targets='all-linear')\n"
        "result = lora.finetune(model, llmspeed.eval.pydoc_text('train'), steps=STEPS, lr=2e-4, seq_len=SEQ,\n"
        "                       batch_size=BATCH, eval_windows=EVAL, progress=False)\n"
        "show([{'trainable_params': result.trainable_params, 'steps': result.steps,\n"
        "       'steps/s': result.steps_per_second,\n"
        "       'held-out ppl before': math.exp(result.eval_loss_before),\n"
        "       'held-out ppl after': math.exp(result.eval_loss_after)}])"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(5, 3)); plt.plot(result.losses); plt.xlabel('step'); plt.ylabel('train loss (nats)')\n"
        "plt.title('QLoRA on int4 SmolLM2'); plt.show()\n"
        "# add_adapter wrapped each layer: its packed weight is now under '<layer>.base_layer.'\n"
        "packed_after = {n.replace('.base_layer.', '.'): b for n, b in model.hf.named_buffers() if b.dtype == torch.uint8}\n"
        "assert packed_before and packed_after.keys() == packed_before.keys(), 'every packed weight found again'\n"
        "unchanged = all(torch.equal(packed_before[n], b) for n, b in packed_after.items())\n"
        "print('packed int4 weights untouched by training:', unchanged)"
    ),
    new_markdown_cell(
        "Adapters save in PEFT's file format and load back (here onto the same base, under a second name):"
    ),
    new_code_cell(
        "import tempfile\n"
        "ids = model.tokenizer('A generator function', return_tensors='pt').input_ids\n"
        "with tempfile.TemporaryDirectory() as folder:\n"
        "    lora.save_adapter(model, folder, 'pydoc')\n"
        "    print(sorted(os.listdir(folder)))\n"
        "    lora.load_adapter(model, folder, 'reloaded')   # a second copy of the adapter, on the same base\n"
        "with torch.no_grad():\n"
        "    reloaded = model.hf(input_ids=ids).logits      # load_adapter made 'reloaded' active\n"
        "    lora.set_adapter(model, 'pydoc')\n"
        "    trained = model.hf(input_ids=ids).logits\n"
        "    with lora.disabled(model):\n"
        "        base = model.hf(input_ids=ids).logits\n"
        "diff = (reloaded - trained).abs().max().item()\n"
        "base_diff = (base - trained).abs().max().item()\n"
        "print(f'reloaded vs trained: max logit difference {diff:.2e}; adapter off vs on: {base_diff:.2e}')"
    ),
]

BATCHING = [
    new_markdown_cell(
        "# Continuous batching against transformers\n\n"
        "A workload of requests with prompts cut from the pydoc text and output lengths drawn from a capped "
        "exponential (EOS ignored and greedy decoding, so every system produces the same tokens: the cell that "
        "times them counts the requests where it does). transformers `generate` one "
        "request at a time and in static batches, against llmspeed's `generate_batched` (iteration-level "
        "scheduling over a paged KV cache), all in this process."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "from llmspeed import SamplingParams\n"
        "N, MEAN, CAP, SINGLE, PROMPTS = (4, 4, 8, 1, (16, 48)) if QUICK else (24, 48, 128, 4, (16, 128))\n"
        "model = llmspeed.models.smollm2()\n"
        "# the workload: prompts cut from the pydoc text, output lengths from a capped exponential (seeded)\n"
        "rng = torch.Generator().manual_seed(0)\n"
        "ids = model.tokenizer(llmspeed.eval.pydoc_text('eval')[:200_000]).input_ids\n"
        "prompts, lengths = [], []\n"
        "for _ in range(N):\n"
        "    size = int(torch.randint(PROMPTS[0], PROMPTS[1] + 1, (1,), generator=rng))\n"
        "    start = int(torch.randint(0, len(ids) - size, (1,), generator=rng))\n"
        "    prompts.append(ids[start:start + size])\n"
        "    draw = torch.empty(1).exponential_(1 / MEAN, generator=rng)\n"
        "    lengths.append(max(1, min(CAP, int(draw))))\n"
        "useful = sum(lengths)\n"
        "print(f'{N} requests, {sum(map(len, prompts))} prompt tokens, {useful} output tokens')"
    ),
    new_code_cell(
        "def hf_generate(batch, prompts, lengths):\n"
        "    tok = model.tokenizer\n"
        "    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id\n"
        "    start, tokens = time.perf_counter(), []\n"
        "    for i in range(0, len(prompts), batch):\n"
        "        chunk = prompts[i:i + batch]\n"
        "        width = max(map(len, chunk))\n"
        "        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])          # [b, width]\n"
        "        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])\n"
        "        with torch.no_grad():\n"
        "            out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths[i:i + batch]),\n"
        "                                    min_new_tokens=max(lengths[i:i + batch]), do_sample=False, pad_token_id=pad)\n"
        "        tokens += [row[width:width + n].tolist() for row, n in zip(out, lengths[i:i + batch])]   # the useful ones\n"
        "    return time.perf_counter() - start, tokens\n\n"
        "rows = []\n"
        "t, one_at_a_time = hf_generate(1, prompts[:SINGLE], lengths[:SINGLE])   # one at a time: slow, so on a subset\n"
        "rows.append({'system': f'transformers generate, one at a time (first {SINGLE} of {N} requests)',\n"
        "             'useful_tok/s': sum(lengths[:SINGLE]) / t})\n"
        "t, static = hf_generate(8, prompts, lengths)\n"
        "rows.append({'system': 'transformers generate, static batches of 8', 'useful_tok/s': useful / t})\n"
        "sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]\n"
        "start = time.perf_counter()\n"
        "outs = model.generate_batched(prompts, sampling, progress=False)\n"
        "t = time.perf_counter() - start\n"
        "assert [len(o.token_ids) for o in outs] == lengths\n"
        "rows.append({'system': 'llmspeed generate_batched', 'useful_tok/s': useful / t})\n"
        "for r in rows:\n"
        "    r['vs_static_batches'] = r['useful_tok/s'] / rows[1]['useful_tok/s']\n"
        "show(rows)\n"
        "ours = [list(o.token_ids) for o in outs]\n"
        "print(f'requests with the same tokens as generate_batched: one at a time '\n"
        "      f'{sum(a == b for a, b in zip(one_at_a_time, ours))}/{SINGLE}, '\n"
        "      f'static batches {sum(a == b for a, b in zip(static, ours))}/{N}')"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(6, 2.5))\n"
        "plt.barh([r['system'] for r in rows], [r['useful_tok/s'] for r in rows]); plt.gca().invert_yaxis()\n"
        "plt.xlabel('useful tokens/s'); plt.title('Throughput on this machine'); plt.show()"
    ),
    new_markdown_cell(
        "Static batches wait for their longest request and pad every prompt to the longest one; continuous "
        "batching lets a finished request leave and a waiting one join at every step. Per-request metrics "
        "come with every output:"
    ),
    new_code_cell(
        "m = outs[0].metrics\n"
        "print(f'finish reason {outs[0].finish_reason!r}, {m.prompt_tokens} prompt tokens, {m.output_tokens} output tokens, '\n"
        "      f'time to first token {m.time_to_first_token:.3f} s, mean inter-token latency {1e3 * m.inter_token_latency:.1f} ms')"
    ),
]

ALL_TOGETHER = [
    new_markdown_cell(
        "# All together: int4 base + LoRA adapters + batched generation\n\n"
        "One SmolLM2 quantized to int4, two adapters trained briefly on different halves of the pydoc "
        "training text, and one batch of requests where each request picks its adapter (or none)."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "from llmspeed import SamplingParams, lora\n"
        "STEPS, SEQ, BATCH, NEW = (1, 32, 1, 6) if QUICK else (15, 128, 2, 32)\n"
        "model = llmspeed.quantize(llmspeed.models.smollm2(), 'int4', group_size=64)\n"
        "train = llmspeed.eval.pydoc_text('train')\n"
        "for name, text in [('first', train[: len(train) // 2]), ('second', train[len(train) // 2 :])]:\n"
        "    if QUICK:  # the test suite: random adapters instead of training (03_qlora.ipynb trains)\n"
        "        lora.add_adapter(model, name, r=8, alpha=16, init='random')\n"
        "    else:\n"
        "        lora.add_adapter(model, name, r=8, alpha=16)\n"
        "        lora.finetune(model, text, steps=STEPS, seq_len=SEQ, batch_size=BATCH, progress=False)\n"
        "mem = llmspeed.memory_footprint(model)\n"
        "show([{k: v / 1e6 for k, v in mem.items()}])   # MB by category: adapters are small"
    ),
    new_code_cell(
        "questions = ['What does the with statement do?', 'Explain list comprehensions.',\n"
        "             'How are exceptions raised?', 'What is a module?']\n"
        "prompts = [[{'role': 'user', 'content': q}] for q in questions]   # chat messages: SmolLM2 is an instruct model\n"
        "adapters = ['first', 'second', None, 'first']\n"
        "sampling = [SamplingParams(max_new_tokens=NEW, adapter=a) for a in adapters]\n"
        "start = time.perf_counter()\n"
        "outs = model.generate_batched(prompts, sampling, progress=False)\n"
        "elapsed = time.perf_counter() - start\n"
        "show([{'adapter': a or '(base)', 'prompt': q, 'tokens': len(o.token_ids), 'text': o.text[:60].replace('\\n', ' ')}\n"
        "      for a, q, o in zip(adapters, questions, outs)])\n"
        "print(f'{sum(len(o.token_ids) for o in outs) / elapsed:.1f} tokens/s for the mixed batch')"
    ),
    new_markdown_cell(
        "Each row ran with its own adapter in the same forward passes (the adapter weights are gathered per "
        "token, as Punica and S-LoRA do). A request with the same adapter alone gives the same greedy tokens, "
        "and the same request on the base model different ones (the adapter did change the output):"
    ),
    new_code_cell(
        "alone = model.generate_batched(prompts[:1], SamplingParams(max_new_tokens=NEW, adapter='first'),\n"
        "                               progress=False)[0]\n"
        "base = model.generate_batched(prompts[:1], SamplingParams(max_new_tokens=NEW), progress=False)[0]\n"
        "print('same tokens as in the mixed batch:', alone.token_ids == outs[0].token_ids)\n"
        "print('different tokens on the base model:', base.token_ids != outs[0].token_ids)"
    ),
]

NOTEBOOKS = {
    "01_precision.ipynb": PRECISION,
    "02_quantization.ipynb": QUANTIZATION,
    "03_qlora.ipynb": QLORA,
    "04_continuous_batching.ipynb": BATCHING,
    "05_all_together.ipynb": ALL_TOGETHER,
}


def build(folder: Path = HERE, names: list[str] | None = None) -> list[Path]:
    """Write every notebook (or those in ``names``) into ``folder``; return the paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem}-{i}"
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def execute(path: Path, timeout: int = 3600) -> None:
    """Run the notebook at ``path`` at its default sizes and write it back with its outputs."""
    import nbclient

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> None:
    """Write the notebooks; with ``--execute``, also run them and keep their outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and write its outputs")
    parser.add_argument("names", nargs="*", help="only these notebooks (default: all)")
    args = parser.parse_args(argv)
    for path in build(HERE, args.names):
        if args.execute:
            execute(path)
        print(path)


if __name__ == "__main__":
    main()
