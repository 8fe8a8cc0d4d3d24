"""The cells of the notebooks about the model itself: ``01_precision``, ``02_quantization`` and ``03_qlora``.

Part of the notebooks' generator (``python examples/make_notebooks.py`` writes them); each list is one notebook.
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_setup import SETUP

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
    new_markdown_cell(
        "GGUF files go both ways: `llmspeed.save(model, 'm.gguf', format='gguf')` writes what llama.cpp, Ollama and "
        "LM Studio run, and `llmspeed.load` reads their files keeping the codes they hold (`Q4_0`, `Q4_1`, `Q4_K` as "
        "int4; `Q8_0` and `Q6_K` as int8, a scale per 32 or 16 channels). The embedded SmolLM2 is itself such a file, "
        "written by llama.cpp's converter: `Q4_1` layers and a `Q8_0` embedding, which becomes the group-wise int8 "
        "head the input embedding reads its rows from."
    ),
    new_code_cell(
        "from llmspeed.models.embedded import gguf_path\n"
        "gguf_model = llmspeed.load(gguf_path())\n"
        "ppl = llmspeed.eval.perplexity(gguf_model, TEXT, window=WINDOW, n_windows=WINDOWS, batch_size=1)\n"
        "print(type(gguf_model.hf.model.layers[0].mlp.up_proj).__name__,\n"
        "      f\"{llmspeed.memory_footprint(gguf_model)['total'] / 1e6:.0f} MB, perplexity {ppl:.2f} \"\n"
        "      f\"({100 * (ppl / base['perplexity'] - 1):+.1f}% vs fp32: the fp32 model is these blocks dequantized)\")"
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
