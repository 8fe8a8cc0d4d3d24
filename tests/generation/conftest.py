"""Generation tests run tiny models whose ops are too small to gain from a second thread; helpers the request
lifecycle tests share (``test_lifecycle*.py``, ``test_live_adapters.py``) and those of the ``test_engine*.py`` files
(``CharTokenizer`` and ``ChatTokenizer`` are imported from ``test_engine.py`` too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from llmspeed import GenerationOutput


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every generation test runs with one intra-op thread (see ``one_thread``)."""


def drain(gen):
    """Step ``gen`` until nothing is left; return every event it produced."""
    events = []
    while gen.has_unfinished():
        events += gen.step()
    return events


def random_adapter(model, name, seed):
    """Add adapter ``name`` with non-zero ``B`` drawn from ``seed`` (it changes the tokens), left inactive."""
    import torch

    from llmspeed import lora

    lora.add_adapter(model, name, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.lora_A:
                layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.5)
    lora.set_adapter(model, None)


def _prompts(n: int, lo: int = 3, hi: int = 60, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _ids(outs: list[GenerationOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


class CharTokenizer:
    """A byte-level stand-in tokenizer (256 ids), enough for stop strings and streaming text."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return [b for b in text.encode("latin-1")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if not (skip_special_tokens and i == 0)).decode("latin-1")


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template that fails, as jinja does, on a message without ``content``."""

    chat_template = "{{ message['content'] }}"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [b for m in messages for b in m["content"].encode("latin-1")]
