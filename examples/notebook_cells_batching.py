"""The cells of the notebooks about serving many requests: ``04_continuous_batching`` and ``05_all_together``.

Part of the notebooks' generator (``python examples/make_notebooks.py`` writes them); each list is one notebook.
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_setup import SETUP

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
    new_markdown_cell(
        "## Structured outputs\n\n"
        "A request can ask for output that matches a JSON schema (or a regular expression, a choice, a grammar): "
        "the tokens that cannot continue a valid output are masked out at every step (xgrammar, as in vLLM), in "
        "the same batch as free-text requests. Below, four requests with a schema and the same four without one: "
        "unconstrained, SmolLM2 wraps its JSON in a Markdown fence, adds fields of its own and may run out of "
        "tokens before it closes the object."
    ),
    new_code_cell(
        "import json\n"
        "people = [('Ann', 31), ('Bo', 45), ('Cy', 27), ('Di', 60)]\n"
        "asks = [[{'role': 'user', 'content': f'Describe {n}, who is {a}, as JSON.'}] for n, a in people]\n"
        "person = {'type': 'object', 'properties': {'name': {'type': 'string', 'maxLength': 16}, 'age': {'type': 'integer'}},\n"
        "          'required': ['name', 'age'], 'additionalProperties': False}\n"
        "schema = SamplingParams(max_new_tokens=40, structured_outputs={'json': person, 'any_whitespace': False})\n"
        "free = SamplingParams(max_new_tokens=40)\n"
        "shaped = model.generate_batched(asks * 2, [schema] * 4 + [free] * 4, progress=False)\n\n"
        "def parses(text):\n"
        "    try:\n"
        "        return isinstance(json.loads(text), dict)\n"
        "    except ValueError:\n"
        "        return False\n\n"
        "show([{'output': 'json schema' if i < 4 else 'free text', 'finish': o.finish_reason, 'parses': parses(o.text),\n"
        "       'text': o.text[:48].replace('\\n', ' ')} for i, o in enumerate(shaped)])\n"
        "assert all(parses(o.text) for o in shaped[:4])"
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
