"""The cells of ``06_serving``: one engine shared by many callers, in-process and over the OpenAI-compatible server.

Part of the notebooks' generator (``python examples/make_notebooks.py`` writes it).
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_setup import SETUP

SERVING = [
    new_markdown_cell(
        "# Serving: one engine, many callers\n\n"
        "`llmspeed.Engine` runs one background step loop over a model: any number of threads and asyncio tasks "
        "submit requests, and every step batches whatever is running (continuous batching over a paged KV cache, "
        "prefix caching on). `OpenAIServer` puts the OpenAI API in front of it, so the `openai` client (and "
        "anything built on it) talks to a quantized SmolLM2 on this machine. Everything runs in this process: the "
        "server on 127.0.0.1 on a free port, stopped at the end."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        "import tempfile\n"
        "from concurrent.futures import ThreadPoolExecutor\n\n"
        "from llmspeed import SamplingParams, lora\n"
        "N, NEW = (4, 12) if QUICK else (16, 64)\n"
        "model = llmspeed.quantize(llmspeed.models.smollm2(), 'int8')\n"
        "# an adapter to load while the server runs (the last section): a few training steps, saved, then removed\n"
        "adapter_dir = os.path.join(tempfile.mkdtemp(), 'pydoc-adapter')\n"
        "lora.add_adapter(model, 'pydoc', r=8, alpha=16, init='random' if QUICK else 'zeros')\n"
        "if not QUICK:\n"
        "    lora.finetune(model, llmspeed.eval.pydoc_text('train'), steps=24, lr=2e-3, seq_len=128, batch_size=2,\n"
        "                  progress=False)\n"
        "lora.save_adapter(model, adapter_dir, 'pydoc')\n"
        "lora.delete_adapter(model, 'pydoc')\n"
        "engine = llmspeed.Engine(model, kv_cache_tokens=8192)\n"
        "questions = ['What is a decorator?', 'Explain generators.', 'What does the with statement do?',\n"
        "             'How are exceptions raised?', 'What is a module?', 'Explain list comprehensions.',\n"
        "             'What is a lambda?', 'How do I read a file?'] * 4\n"
        "chats = [[{'role': 'user', 'content': q}] for q in questions[:N]]\n"
        "sampling = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)\n\n"
        "# N threads, each submitting its own request and waiting for it: the engine batches them\n"
        "start = time.perf_counter()\n"
        "with ThreadPoolExecutor(N) as pool:\n"
        "    outs = list(pool.map(lambda chat: engine.submit(chat, sampling).result(), chats))\n"
        "together = time.perf_counter() - start\n"
        "show([{'question': q, 'tokens': len(o.token_ids), 'answer': o.text[:60].replace('\\n', ' ')}\n"
        "      for q, o in zip(questions[:4], outs[:4])])\n"
        "print({k: v for k, v in engine.metrics().items() if k.startswith(('tokens', 'requests', 'prefix'))})"
    ),
    new_markdown_cell(
        "The same requests one at a time (each waits for the one before): the engine's step takes about as long "
        "for one request as for several, so callers who arrive together are served in about the time of one."
    ),
    new_code_cell(
        "start = time.perf_counter()\n"
        "alone = [engine.submit(chat, sampling).result() for chat in chats]\n"
        "one_by_one = time.perf_counter() - start\n"
        "assert [o.token_ids for o in alone] == [o.token_ids for o in outs]  # greedy: the same tokens either way\n"
        "tokens = sum(len(o.token_ids) for o in outs)\n"
        "rows = [{'callers': f'{N} threads at once', 'seconds': together, 'tok/s': tokens / together},\n"
        "        {'callers': 'one at a time', 'seconds': one_by_one, 'tok/s': tokens / one_by_one}]\n"
        "show(rows)\n"
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(6, 2))\n"
        "plt.barh([r['callers'] for r in rows], [r['tok/s'] for r in rows]); plt.gca().invert_yaxis()\n"
        "plt.xlabel('generated tokens/s'); plt.title(f'{N} requests of {NEW} tokens, int8 SmolLM2'); plt.show()"
    ),
    new_markdown_cell(
        "## The OpenAI-compatible server\n\n"
        "`python -m llmspeed serve --model smollm2 --quantize int8` does this from the command line; here the "
        "server wraps the engine above and runs in a thread (uvicorn), with runtime LoRA loading allowed."
    ),
    new_code_cell(
        "import socket\n"
        "import threading\n\n"
        "import openai\n"
        "import uvicorn\n\n"
        "from llmspeed.serving.server import OpenAIServer\n\n"
        "with socket.socket() as s:  # a free port on this machine\n"
        "    s.bind(('127.0.0.1', 0))\n"
        "    port = s.getsockname()[1]\n"
        "server = OpenAIServer(engine, 'smollm2', allow_runtime_lora=True)\n"
        "uv = uvicorn.Server(uvicorn.Config(server.app(), host='127.0.0.1', port=port, log_level='error'))\n"
        "threading.Thread(target=uv.run, daemon=True).start()\n"
        "while not uv.started:\n"
        "    time.sleep(0.05)\n"
        "url = f'http://127.0.0.1:{port}'\n"
        "client = openai.OpenAI(base_url=f'{url}/v1', api_key='none')\n"
        "print([m.id for m in client.models.list()])\n"
        "answer = client.chat.completions.create(model='smollm2', messages=chats[0], max_tokens=NEW, temperature=0)\n"
        "print(answer.choices[0].message.content, '|', answer.usage)"
    ),
    new_markdown_cell("Streamed, the text arrives as it is generated:"),
    new_code_cell(
        "start, pieces, first = time.perf_counter(), [], None\n"
        "for chunk in client.chat.completions.create(model='smollm2', messages=chats[1], max_tokens=NEW,\n"
        "                                            temperature=0, stream=True):\n"
        "    if chunk.choices and chunk.choices[0].delta.content:\n"
        "        first = first or time.perf_counter() - start\n"
        "        pieces.append(chunk.choices[0].delta.content)\n"
        "print(''.join(pieces))\n"
        "print(f'{len(pieces)} chunks, first after {first:.3f} s')"
    ),
    new_markdown_cell(
        "Structured output: a JSON schema (here from a pydantic model) masks out every token that cannot continue "
        "a valid answer, so `parse` always gets an object of the right shape:"
    ),
    new_code_cell(
        "from pydantic import BaseModel\n\n"
        "class Person(BaseModel):\n"
        "    name: str\n"
        "    age: int\n\n"
        "parsed = client.chat.completions.parse(\n"
        "    model='smollm2', messages=[{'role': 'user', 'content': 'Describe Ann, who is 31, as JSON.'}],\n"
        "    response_format=Person, max_tokens=40, temperature=0)\n"
        "print(repr(parsed.choices[0].message.parsed))"
    ),
    new_markdown_cell(
        "## Adapters loaded while the server runs\n\n"
        "vLLM's `/v1/load_lora_adapter` (allowed above with `allow_runtime_lora=True`, on the command line "
        "`--allow-runtime-lora-updating`): the adapter saved in the first cell is served under its name at once, "
        "beside the base model, and requests for either run in the same batches."
    ),
    new_code_cell(
        "import httpx\n\n"
        "r = httpx.post(f'{url}/v1/load_lora_adapter', json={'lora_name': 'pydoc', 'lora_path': adapter_dir})\n"
        "print(r.status_code, r.text, [m.id for m in client.models.list()])\n"
        "ask = dict(messages=chats[2], max_tokens=NEW, temperature=0)\n"
        "base = client.chat.completions.create(model='smollm2', **ask).choices[0].message.content\n"
        "tuned = client.chat.completions.create(model='pydoc', **ask).choices[0].message.content\n"
        "same = next((i for i, (a, b) in enumerate(zip(base, tuned)) if a != b), min(len(base), len(tuned)))\n"
        "show([{'model': 'smollm2', 'answer from where they part': base[same:same + 70].replace('\\n', ' ')},\n"
        "      {'model': 'pydoc (adapter)', 'answer from where they part': tuned[same:same + 70].replace('\\n', ' ')}])\n"
        "print(f'the answers share their first {same} characters')\n"
        "metrics = httpx.get(f'{url}/metrics').text  # Prometheus text, for a scraper\n"
        "print([line for line in metrics.splitlines() if line.startswith('llmspeed_generation_tokens_total')])"
    ),
    new_code_cell(
        "uv.should_exit = True  # stop the server, then the engine\n"
        "time.sleep(0.5)\n"
        "engine.close()\n"
        "print('engine closed:', engine.closed)"
    ),
]
