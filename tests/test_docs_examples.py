"""Every code block of README.md and docs/*.md runs, or says in the markdown why it cannot.

The rules (also in docs/reproduce.md, "The examples are tested"):

- The ``python`` blocks of one page run in order in one namespace, in a temporary folder, as a reader
  pasting them into one interpreter would.
- A block that cannot run on a CPU CI machine (a GPU, a shell command, a download, a long benchmark,
  an illustrative fragment) carries the marker ``<!-- docs-test: skip: <reason> -->`` on the line above
  its fence. Every ``bash``/``sh``/``console`` block needs one; blocks without a language are output.
- ``LLMSPEED_EXAMPLES_QUICK=1`` (this module sets it unless it is set to ``0``) shrinks the sizes in
  keyword arguments (``steps=``, ``max_new_tokens=``, ...; see :data:`QUICK_CAPS`) so that all pages run in
  a few minutes on 2 CPU cores; the notebooks read the same variable.
- The ``::`` example blocks of the packages' docstrings (``llmspeed.lora``, ``llmspeed.qat``) run in order too,
  on a tiny random model.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "bench").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(?P<reason>[^>]*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
RUN_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
QUICK_ENV = "LLMSPEED_EXAMPLES_QUICK"
# keyword argument -> the most it may be in quick mode
QUICK_CAPS = {
    "steps": 2, "max_new_tokens": 8, "eval_windows": 1, "batch_size": 2, "seq_len": 64, "n_windows": 1,
    "window": 64, "n_sequences": 4, "num_prompts": 4, "iters": 2,
}  # fmt: skip


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line number, language, source and skip reason (if marked)."""

    page: Path
    line: int
    lang: str
    source: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` (``pymdownx.superfences`` style, unindented fences)."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match["lang"].lower()
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(above)
        found.append(Block(page, start + 1, lang, "\n".join(lines[start + 1 : i]), marker["reason"] if marker else None))
        i += 1
    return found


def quick(source: str) -> str:
    """``source`` with each keyword argument of :data:`QUICK_CAPS` capped (``steps=200`` -> ``steps=2``)."""
    pattern = re.compile(r"\b(?P<key>" + "|".join(QUICK_CAPS) + r")=(?P<value>\d+)\b")
    return pattern.sub(lambda m: f"{m['key']}={min(int(m['value']), QUICK_CAPS[m['key']])}", source)


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.lang in RUN_LANGS and b.skip is None})


def test_every_block_is_run_or_marked_with_a_reason():
    unmarked = [b.where for b in ALL_BLOCKS if b.lang in SHELL_LANGS and b.skip is None]
    assert not unmarked, f"shell blocks need <!-- docs-test: skip: <reason> --> above them: {unmarked}"
    empty = [b.where for b in ALL_BLOCKS if b.skip is not None and len(b.skip) < 8]
    assert not empty, f"say why in the skip marker: {empty}"
    unknown = sorted({b.lang for b in ALL_BLOCKS} - RUN_LANGS - SHELL_LANGS - {"", "text", "json", "yaml", "toml"})
    assert not unknown, f"code blocks in languages the test neither runs nor skips: {unknown}"


def test_the_skipped_blocks(capsys):
    """Lists the blocks that do not run (``pytest -s`` shows them), and checks the list is not most of them."""
    skipped = [b for b in ALL_BLOCKS if b.skip is not None]
    for b in skipped:
        print(f"{b.where}: {b.skip}")
    python = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS]
    assert sum(b.skip is None for b in python) >= len(python) * 3 // 4, "most python blocks must run"


def test_quick_caps_keyword_sizes_only():
    src = "lora.finetune(model, steps=200, lr=1e-3, seq_len=256, batch_size=8, eval_windows=16)\nmax_steps=9"
    assert quick(src) == "lora.finetune(model, steps=2, lr=1e-3, seq_len=64, batch_size=2, eval_windows=1)\nmax_steps=9"
    assert quick("SamplingParams(max_new_tokens=4)") == "SamplingParams(max_new_tokens=4)"


def test_blocks_are_found_with_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- docs-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```python\nx = 1\n```\n")
    found = blocks(page)
    assert [(b.lang, b.skip, b.source, b.line) for b in found] == [("bash", "needs a GPU", "nvidia-smi", 4),
                                                                   ("python", None, "x = 1", 8)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch):
    if os.environ.get(QUICK_ENV) != "0":
        monkeypatch.setenv(QUICK_ENV, "1")
    fast = os.environ.get(QUICK_ENV) == "1"
    monkeypatch.chdir(tmp_path)  # blocks write folders such as "out/"
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.lang not in RUN_LANGS or block.skip is not None:
            continue
        source = quick(block.source) if fast else block.source
        code = compile("\n" * (block.line) + source, str(page), "exec")  # tracebacks show the page's line numbers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # examples may warn on purpose (lora.merge on a quantized base)
            exec(code, namespace)


def docstring_block(doc: str) -> str:
    """The indented example after the first line of ``doc`` that ends in ``::`` (reST literal block), dedented."""
    import textwrap

    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    body = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break
        body.append(line)
    return textwrap.dedent("\n".join(body)).strip()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["llmspeed.lora", "llmspeed.qat", "llmspeed.qat.api"])
def test_package_docstring_examples_run_in_order(module, tmp_path, monkeypatch):
    """The example blocks of the packages' docstrings run top to bottom on a tiny model (quick sizes).

    ``llmspeed.lora``'s called ``merge_and_unload`` while the ``"sql2"`` it had loaded was still there
    (a ``ValueError``), then ``per_token_adapters`` on the unloaded model; ``llmspeed.qat.api``'s passed
    ``steps=...``."""
    import importlib

    import torch

    import llmspeed

    monkeypatch.chdir(tmp_path)
    source = quick(docstring_block(importlib.import_module(module).__doc__ or ""))
    source = source.replace("model.forward_batch(...)", "pass")  # the one call left to the reader's batch
    namespace = {
        "llmspeed": llmspeed, "lora": llmspeed.lora, "qat": llmspeed.qat, "names": ["sql", None],
        "model": llmspeed.models.tiny("llama", seed=0), "texts": torch.randint(0, 256, (4096,)),
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, module, "exec"), namespace)
