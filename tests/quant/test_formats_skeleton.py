"""``parameters_on_meta``: the loader's block that builds a model's parameters on ``meta`` touches its own thread only.

Regression: the block replaced ``nn.Module.register_parameter`` for the whole process, so a server thread building a
module while another thread loaded a checkpoint got ``meta`` parameters, and two loads that overlapped in two threads
left the replacement installed for good (each restored the method it had found, the second one the first's patch).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from llmspeed.quant.formats.skeleton import parameters_on_meta


def test_inside_the_block_parameters_are_on_meta_and_after_it_real():
    original = nn.Module.register_parameter
    with parameters_on_meta():
        inside = nn.Linear(4, 3)
        with parameters_on_meta():  # nested in the same thread
            nested = nn.Linear(2, 2)
    after = nn.Linear(4, 3)
    assert inside.weight.device.type == nested.weight.device.type == "meta"
    assert after.weight.device.type == "cpu" and nn.Module.register_parameter is original


def test_another_thread_gets_real_parameters_while_a_block_is_open():
    entered, built = threading.Event(), threading.Event()
    seen = {}

    def other() -> None:
        entered.wait(timeout=10)
        seen["weight"] = nn.Linear(4, 3).weight
        built.set()

    worker = threading.Thread(target=other)
    worker.start()
    with parameters_on_meta():
        entered.set()
        assert built.wait(timeout=10)
        mine = nn.Linear(4, 3)
    worker.join(timeout=10)
    assert mine.weight.device.type == "meta"
    assert seen["weight"].device.type == "cpu" and torch.isfinite(seen["weight"]).all()


def test_blocks_that_overlap_in_two_threads_leave_the_original_method():
    original = nn.Module.register_parameter
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    devices = {}

    def second() -> None:
        first_in.wait(timeout=10)
        with parameters_on_meta():
            second_in.set()
            first_out.wait(timeout=10)  # the first block closes while this one is open
            devices["second"] = nn.Linear(2, 2).weight.device.type

    worker = threading.Thread(target=second)
    worker.start()
    with parameters_on_meta():
        first_in.set()
        assert second_in.wait(timeout=10)
        devices["first"] = nn.Linear(2, 2).weight.device.type
    first_out.set()
    worker.join(timeout=10)
    assert devices == {"first": "meta", "second": "meta"}
    assert nn.Module.register_parameter is original and nn.Linear(2, 2).weight.device.type == "cpu"
