"""DecodeGraphs' bookkeeping on the CPU: which captured graph a decode step replays, with what inputs.

Capturing needs a GPU (``pytest -m gpu`` runs the real thing in test_engine and test_triton_attention);
here the graphs are stand-ins that record their replays.
"""

from __future__ import annotations

import torch

from llmspeed.generation.cuda_graphs import DecodeGraphs, bucket
from llmspeed.generation.kv_cache import PagedKVCache
from llmspeed.generation.runner import StepInput
from llmspeed.protocol import ModelSpec

SPEC = ModelSpec("Test", 1, 4, 2, 8, 32, 10, 64, torch.float32, torch.device("cpu"))


class _FakeGraph:
    def __init__(self):
        self.replays: list[tuple[list[int], list[int], list[int], int]] = []

    def replay(self, ids, pos, slots, tables, lens, width, pad_block, device_ids=None):
        self.replays.append((list(ids), list(slots), list(lens), width))
        self.device_ids = device_ids
        return torch.zeros(len(ids), 10)


def _graphs(monkeypatch) -> tuple[DecodeGraphs, list[tuple[int, int]]]:
    graphs = DecodeGraphs(model=None, cache=PagedKVCache(SPEC, num_blocks=40, block_size=4), pad_block=39, max_batch=8)
    captured: list[tuple[int, int]] = []

    def capture(rows: int, context: int) -> bool:
        key = graphs.key(rows, context)
        if key not in graphs._graphs:
            captured.append(key)
            graphs._graphs[key] = _FakeGraph()
        return True

    monkeypatch.setattr(graphs, "capture", capture)
    return graphs, captured


def _step(chunks):
    """A decode-only StepInput from ``(block_table, position, 1, token)`` rows (block size 4)."""
    return StepInput.decode([(t, pos, tok) for t, pos, _, tok in chunks], 4)


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]
    assert bucket(3, minimum=8) == 8


def test_steps_replay_the_graph_of_their_bucket_with_their_slots(monkeypatch):
    graphs, captured = _graphs(monkeypatch)
    chunks = [([0, 1], 5, 1, 11), ([2], 2, 1, 12), ([3, 4, 5], 9, 1, 13)]  # (block table, position, 1, token)
    logits = graphs.run(_step(chunks))
    assert logits.shape == (3, 10)
    assert captured == [(4, 4)]  # 3 rows -> 4; 10 tokens of context -> 3 blocks -> at least 4
    ids, slots, lens, width = graphs._graphs[(4, 4)].replays[0]
    assert ids == [11, 12, 13] and lens == [6, 3, 10] and width == 4
    assert slots == [1 * 4 + 1, 2 * 4 + 2, 5 * 4 + 1]  # block of the position * block size + offset
    assert graphs._graphs[(4, 4)].device_ids is None
    on_device = torch.tensor([21, 22, 23])  # a greedy burst's ids: the previous step's argmax, not on the host
    graphs.run(_step(chunks), on_device)
    assert graphs._graphs[(4, 4)].device_ids is on_device and len(graphs._graphs[(4, 4)].replays) == 2


def test_a_wider_captured_graph_serves_shorter_contexts_without_a_new_capture(monkeypatch):
    graphs, captured = _graphs(monkeypatch)
    long_table = list(range(20))
    graphs.run(_step([(long_table, 70, 1, 1), ([21], 0, 1, 2)]))  # 71 tokens -> 18 blocks -> width 32
    assert captured == [(2, 32)]
    graphs.run(_step([([22], 3, 1, 3), ([23], 1, 1, 4)]))  # needs width 4: the (2, 32) graph serves it
    assert captured == [(2, 32)] and len(graphs._graphs[(2, 32)].replays) == 2
    graphs.run(_step([([24], 3, 1, 5)] * 3))  # 3 rows: another batch bucket, captured
    assert captured == [(2, 32), (4, 4)]
    assert graphs.run(_step([([25], 0, 1, 6)] * 9)) is None  # more rows than max_batch: the step runs eagerly


def test_a_replay_takes_the_device_ids_of_a_burst_over_the_host_placeholders():
    """``_Graph.replay`` fills the graph's static inputs from the host, then the burst's ids (the previous step's
    argmax, on the device) over the ids: copied after the host's placeholders, before the replay, rows past ``n``
    padded. Checked on the CPU with a stand-in for the captured graph (capturing needs a GPU)."""
    from llmspeed.generation.cuda_graphs import _Graph

    graph = object.__new__(_Graph)  # the static buffers of a 4-row, 2-block graph, without a capture
    graph.block_size = 4
    graph.ids, graph.pos, graph.slots, graph.lens = (torch.full((4,), -1) for _ in range(4))
    graph.blocks = torch.full((8,), -1)
    seen = {}

    class Captured:
        def replay(self):
            seen["ids"], seen["pos"], seen["blocks"] = graph.ids.tolist(), graph.pos.tolist(), graph.blocks.tolist()

    graph.graph, graph.logits = Captured(), torch.arange(40.0).reshape(4, 10)
    logits = graph.replay([0, 0, 0], [5, 2, 6], [9, 14, 26], [[0, 2], [3], [6, 7]], [6, 3, 7], 2, 39,
                          torch.tensor([21, 22, 23]))  # fmt: skip
    assert seen["ids"] == [21, 22, 23, 0] and seen["pos"] == [5, 2, 6, 0]
    assert seen["blocks"] == [0, 2, 3, 39, 6, 7, 39, 39] and logits.shape == (3, 10)
    graph.replay([11, 12], [1, 2], [1, 2], [[0], [0]], [2, 3], 2, 39)  # a single step: the host's ids
    assert seen["ids"] == [11, 12, 0, 0]


def test_a_graph_is_captured_on_the_models_device_not_the_current_one(monkeypatch):
    """Regression: the warm-up stream, the waits and the capture used the current device's streams, so for a model
    on cuda:1 while cuda:0 is current the warm-up ran on cuda:1's default stream and the capture saw none of the
    model's kernels. Every stream and the capture now run under the model's device. Checked on the CPU with
    stand-ins for the CUDA calls (capturing needs a GPU)."""
    import contextlib

    from llmspeed.generation import cuda_graphs

    current = ["cuda:0"]
    seen: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], str(d)
        try:
            yield
        finally:
            current[0] = before

    class Stream:
        def __init__(self):
            seen.append(("stream", current[0]))

        def wait_stream(self, other):
            seen.append(("wait", current[0]))

    @contextlib.contextmanager
    def in_context(*args, **kwargs):
        seen.append(("context", current[0]))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", in_context)
    monkeypatch.setattr(torch.cuda, "graph", in_context)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    calls = []
    graph, out = cuda_graphs.capture(lambda: calls.append(current[0]) or torch.ones(1), None, torch.device("cuda", 1))
    assert graph == "graph" and out.tolist() == [1.0]
    assert calls == ["cuda:1"] * 3 and seen and all(where == "cuda:1" for _, where in seen), seen
    assert current == ["cuda:0"]
