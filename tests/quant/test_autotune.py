"""``kernel="auto"`` on the CPU: candidates timed once per key, choices cached on disk per machine, rules when off."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed.quant import Int4Linear, Int8Linear, NF4Linear, QuantConfig
from llmspeed.quant.kernels import KERNELS, amx, auto, tuning


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Timing on, choices in a fresh private cache under ``tmp_path``; the machine's store restored afterwards."""
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tuning, "default_folder", lambda: tmp_path / "autotune")  # the kernels' cache stays put
    tuning.reset()
    yield tmp_path
    tuning.reset()


def _module(cls, k=128, n=96, group=32):
    torch.manual_seed(0)
    config = QuantConfig(cls.quant_format, None if cls is Int8Linear else group)
    return cls.from_linear(nn.Linear(k, n), config)


def _fake_times(monkeypatch, times: dict[str, float], calls: list):
    def fake(candidates, timer=None):
        calls.append(sorted(candidates))
        return {name: times.get(name, 50.0) for name in candidates}

    monkeypatch.setattr(tuning, "time_candidates", fake)


def test_pick_keeps_the_guess_unless_beaten_by_more_than_the_margin():
    assert tuning.pick({"cpp": 1.02, "dequant_fp32": 1.0}, "cpp") == "cpp"
    assert tuning.pick({"cpp": 1.05, "dequant_fp32": 1.0}, "cpp") == "dequant_fp32"
    assert tuning.pick({"cpp": 1.0, "dequant_fp32": 2.0}, "dequant_fp32") == "cpp"


def test_rows_buckets_are_powers_of_two_and_cap_at_the_timed_rows():
    assert [tuning.rows_bucket(m) for m in (1, 2, 3, 5, 64, 65, 256, 257, 4096)] == [1, 2, 4, 8, 64, 128, 256, 512, 512]


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, NF4Linear])
def test_auto_times_cpu_candidates_once_and_caches_the_choice_on_disk(tuned, monkeypatch, cls):
    module = _module(cls)
    x = torch.randn(3, 128)
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0, "reference": 5.0}, calls)
    assert auto.auto_kernel(module, x).name == "dequant_fp32"  # the rule table guesses cpp at M = 3
    assert auto.auto_kernel(module, x[:1].repeat(4, 1)).name == "dequant_fp32"  # M = 4: same bucket
    assert len(calls) == 1 and {"cpp", "dequant_fp32"} <= set(calls[0])
    assert "aten_int4_cpu" not in calls[0]  # keeps a second copy of the weight: only when named
    files = list((tuned / "autotune").glob("*.json"))
    assert len(files) == 1 and stat.S_IMODE((tuned / "autotune").stat().st_mode) == 0o700
    data = json.loads(files[0].read_text())
    assert data["machine"] == tuning.machine_key()
    (entry,) = data["choices"].values()
    assert entry["kernel"] == "dequant_fp32" and entry["ms"]["cpp"] == 9.0
    # a new process (a fresh store) reads the choice instead of timing again
    tuning.reset()
    assert auto.auto_kernel(module, x).name == "dequant_fp32" and len(calls) == 1


def test_an_empty_input_is_not_timed_nor_stored_as_the_one_row_choice(tuned, monkeypatch):
    """Regression: a zero-row forward timed the candidates on an empty input and stored the winner under the one-row
    (decode) bucket, where later processes read it (found by the kernels audit)."""
    module = _module(Int4Linear)
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, calls)
    assert module(torch.randn(0, 128)).shape == (0, 96)
    assert calls == [] and not list((tuned / "autotune").glob("*.json"))
    assert auto.auto_kernel(module, torch.randn(1, 128)).name == "dequant_fp32" and len(calls) == 1  # timed for real


def test_choices_timed_with_other_kernel_code_are_not_reused(tuned, monkeypatch, tmp_path):
    """A kernel change (a new llmspeed, an edited .cpp or .h) must time again: the old choice was for old code."""
    old, new = tmp_path / "old", tmp_path / "new"
    for root, body in ((old, "return 1;"), (new, "return 2;")):
        (root / "kernels").mkdir(parents=True)
        (root / "kernels" / "k.h").write_text(f"int k() {{ {body} }}")
        (root / "notes.txt").write_text(str(root))  # not kernel code: ignored
    assert tuning.sources_digest(old) != tuning.sources_digest(new)
    module, x = _module(Int4Linear), torch.randn(3, 128)
    calls: list = []
    monkeypatch.setattr(tuning, "SOURCES", old)
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, calls)
    assert auto.auto_kernel(module, x).name == "dequant_fp32" and len(calls) == 1
    monkeypatch.setattr(tuning, "SOURCES", new)
    tuning.reset()
    _fake_times(monkeypatch, {"dequant_fp32": 9.0, "cpp": 1.0}, calls)
    assert auto.auto_kernel(module, x).name == "cpp" and len(calls) == 2  # timed again, not the stored choice
    monkeypatch.setattr(tuning, "SOURCES", old)
    tuning.reset()
    assert auto.auto_kernel(module, x).name == "dequant_fp32" and len(calls) == 2  # the old code's own choice


def test_choices_depend_on_threads_shape_bucket_and_dtype(tuned, monkeypatch):
    module = _module(Int4Linear)
    calls: list = []
    _fake_times(monkeypatch, {"cpp": 1.0}, calls)
    auto.auto_kernel(module, torch.randn(1, 128))
    auto.auto_kernel(module, torch.randn(100, 128))  # another rows bucket
    auto.auto_kernel(module, torch.randn(1, 128, dtype=torch.bfloat16))  # another dtype
    auto.auto_kernel(_module(Int4Linear, n=64), torch.randn(1, 128))  # another shape
    assert len(calls) == 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before != 1 else 2)
        auto.auto_kernel(module, torch.randn(1, 128))  # another thread count: another store and file
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 5 and len(list((tuned / "autotune").glob("*.json"))) == 2


def test_choice_keys_tell_groups_and_double_quantization_apart_and_machine_keys_torch_versions(monkeypatch):
    x = torch.randn(4, 128)
    assert tuning.choice_key(_module(Int4Linear, group=32), x) != tuning.choice_key(_module(Int4Linear, group=64), x)
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    plain = NF4Linear.from_linear(linear, QuantConfig("nf4", 32))
    double = NF4Linear.from_linear(linear, QuantConfig("nf4", 32, double_quant=True))
    assert tuning.choice_key(plain, x) != tuning.choice_key(double, x)
    key = tuning.machine_key()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert tuning.machine_key() != key


def test_two_processes_writing_choices_keep_each_others(tuned):
    """Each write merges what is on disk: a store that loaded the file before another process wrote to it keeps
    that process's choice instead of writing its own older view over it."""
    folder = tuned / "autotune"
    first, second = tuning.ChoiceStore("m", folder), tuning.ChoiceStore("m", folder)
    assert second.get("a") is None  # loaded (nothing yet)
    first.put("a", "cpp", {"cpp": 1.0})
    second.put("b", "amx", {"amx": 1.0})
    assert tuning.ChoiceStore("m", folder).get("a") == "cpp" and tuning.ChoiceStore("m", folder).get("b") == "amx"


def test_the_row_limit_of_a_rule_includes_its_bound(monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert auto.AUTO_RULES[("cpu", "int4")][0] == (8, None, "cpp")
    assert auto.auto_kernel(_module(Int4Linear), torch.randn(8, 128)).name == "cpp"


def test_float_and_int8_activation_layers_keep_their_own_choices(tuned, monkeypatch):
    """Regression: the key left ``activations`` out, so a float and an int8-activation layer of one shape shared
    an entry; their candidates differ (``cpp_panels``), so each timed again over the other's choice, in every
    process, and where the candidates matched the float layer's timing was taken for the other."""
    calls: list = []
    _fake_times(monkeypatch, {"cpp": 1.0}, calls)
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    plain = Int4Linear.from_linear(linear, QuantConfig("int4", 32))
    coded = Int4Linear.from_linear(linear, QuantConfig("int4", 32, activations="int8"))
    x = torch.randn(64, 128)
    assert tuning.choice_key(plain, x) != tuning.choice_key(coded, x)
    for _ in range(3):  # three processes
        assert auto.auto_kernel(plain, x).name == auto.auto_kernel(coded, x).name == "cpp"
        tuning.reset()
    assert len(calls) == 2  # each timed once, then read back


def test_timing_off_follows_the_rule_table_and_writes_nothing(tuned, monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, calls)
    module = _module(Int4Linear)
    assert auto.auto_kernel(module, torch.randn(2, 128)).name == "cpp"
    tiles = amx.unavailable() is None  # prompt-sized rows go to AMX tiles where the CPU has them
    assert auto.auto_kernel(module, torch.randn(300, 128)).name == ("amx" if tiles else "dequant_fp32")
    assert calls == [] and not (tuned / "autotune").exists()


def test_an_unknown_autotune_value_keeps_timing_on_and_says_so(monkeypatch):
    """Regression: ``LLMSPEED_AUTOTUNE=disable`` (or a typo such as ``O`` for ``0``) kept timing on without a word."""
    monkeypatch.setattr(tuning, "_WARNED", set())
    for setting, on in (("0", False), (" Off ", False), ("no", False), ("1", True), ("yes", True), ("", True)):
        monkeypatch.setenv(tuning.AUTOTUNE_ENV, setting)
        assert tuning.enabled() is on
    assert not tuning._WARNED
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "disable")
    with pytest.warns(RuntimeWarning, match=r"LLMSPEED_AUTOTUNE='disable' is not one of 1, 0, .* timing stays on"):
        assert tuning.enabled() is True


def test_the_tuned_module_computes_what_the_reference_does(tuned):
    # real timing: whichever kernel wins, the output is the oracle's
    for cls in (Int8Linear, Int4Linear, NF4Linear):
        module = _module(cls)
        for m in (1, 5, 300):
            x = torch.randn(m, 128)
            ref = KERNELS["reference"].run(module, x) + module.bias
            torch.testing.assert_close(module(x), ref, rtol=1e-4, atol=1e-4)
    assert tuning.store().seconds > 0 and len(tuning.store().choices) == 9


def test_a_cache_file_from_another_machine_or_garbage_is_ignored(tuned, monkeypatch):
    module = _module(Int4Linear)
    x = torch.randn(1, 128)
    key = tuning.choice_key(module, x)
    folder = tuned / "autotune"
    folder.mkdir(mode=0o700)
    path = folder / tuning.store().name
    names = sorted(k.name for k in auto.cpu_candidates(module, x))  # raced against the same kernels, elsewhere
    path.write_text(json.dumps({"machine": "another CPU", "choices": {key: {"kernel": "dequant_fp32", "candidates": names}}}))
    calls: list = []
    _fake_times(monkeypatch, {"cpp": 1.0}, calls)
    assert auto.auto_kernel(module, x).name == "cpp" and len(calls) == 1
    path.write_text("{not json")
    tuning.reset()
    assert auto.auto_kernel(module, x).name == "cpp" and len(calls) == 2


@pytest.mark.parametrize(
    "entry",
    [{"kernel": ["cpp"]}, {"kernel": "cpp", "candidates": 5}, {"kernel": "cpp", "candidates": [["cpp"]]},
     {"kernel": "cpp", "ms": "fast"}, {"kernel": "cpp", "ms": {"cpp": "fast"}}, {"kernel": "cpp", "guess": ["cpp"]}],
)  # fmt: skip
def test_a_cache_entry_of_the_wrong_shape_is_timed_again_not_crashed_on(tuned, monkeypatch, entry):
    """Regression: valid JSON holding an entry of the wrong shape (a hand-edited file) raised TypeError inside the
    module's matmul (``unhashable type: 'list'``) and AttributeError/ValueError inside ``str(llmspeed.kernels())``."""
    module, x = _module(Int4Linear), torch.randn(1, 128)
    key = tuning.choice_key(module, x)
    names = sorted(k.name for k in auto.cpu_candidates(module, x))
    folder = tuned / "autotune"
    folder.mkdir(mode=0o700)
    choices = {key: {"candidates": names, "ms": {"cpp": 1.0}, **entry}}
    (folder / tuning.store().name).write_text(json.dumps({"machine": tuning.machine_key(), "choices": choices}))
    calls: list = []
    _fake_times(monkeypatch, {"cpp": 1.0}, calls)
    assert key not in llmspeed.kernels(rows=(1,)).tuned  # the report neither lists nor trips on it
    assert auto.auto_kernel(module, x).name == "cpp" and len(calls) == 1
    assert "cpp 1" in str(llmspeed.kernels(rows=(1,)))  # the new choice, written over the bad one


def test_a_cache_folder_others_can_write_is_not_used(tuned, monkeypatch):
    folder = tuned / "autotune"
    folder.mkdir()
    os.chmod(folder, 0o777)
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, calls)
    with pytest.warns(RuntimeWarning, match="can be written by other users"):
        assert auto.auto_kernel(_module(Int4Linear), torch.randn(1, 128)).name == "dequant_fp32"
    assert list(folder.iterdir()) == []  # the choice lives in memory only


def test_the_report_lists_the_timed_choices(tuned, monkeypatch):
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, [])
    auto.auto_kernel(_module(Int4Linear), torch.randn(1, 128))
    report = llmspeed.kernels()
    assert report.autotune is True
    (entry,) = report.tuned.values()
    assert entry["kernel"] == "dequant_fp32"
    assert "dequant_fp32" in str(report) and "autotune on" in str(report)


def test_a_candidate_that_raises_is_left_out_with_a_warning(tuned, monkeypatch):
    def boom(module, x):
        raise RuntimeError("no code for this CPU")

    monkeypatch.setitem(KERNELS, "dequant_fp32", dataclasses.replace(KERNELS["dequant_fp32"], run=boom))
    with pytest.warns(RuntimeWarning, match="'dequant_fp32' failed while being timed"):
        chosen = auto.auto_kernel(_module(Int4Linear), torch.randn(300, 128))  # a candidate at M=300
    assert chosen.name in ("amx", "cpp", "reference")


def test_a_choice_is_timed_again_when_the_candidates_change(tuned, monkeypatch):
    """A kernel added since the choice was timed (or one that now builds) races again; a cached choice
    from before candidates were recorded is not trusted."""
    module = _module(Int8Linear)
    x = torch.randn(3, 128)
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0, "reference": 5.0, "newcomer": 0.1}, calls)
    assert auto.auto_kernel(module, x).name == "dequant_fp32"
    key = tuning.choice_key(module, x)
    assert set(tuning.store().choices[key]["candidates"]) == set(calls[0])
    newcomer = dataclasses.replace(KERNELS["dequant_fp32"], name="newcomer")
    monkeypatch.setitem(KERNELS, "newcomer", newcomer)
    tuning.reset()  # a new process: the file holds the old choice, raced without the newcomer
    assert auto.auto_kernel(module, x).name == "newcomer" and len(calls) == 2 and "newcomer" in calls[1]
    entry = tuning.store().choices[key]
    del entry["candidates"]  # a file written before candidates were recorded
    assert tuning.store().get(key, set(calls[1])) is None and tuning.store().get(key) == "newcomer"


def test_cpu_timing_keeps_the_fastest_call_so_preempted_calls_do_not_decide():
    """A kernel whose calls sometimes lose the core (here: every other call sleeps 10 ms) is timed by its
    fast calls, and still beats a steadily slower one."""
    import time

    from llmspeed.timing import cpu_ms

    n = {"bursty": 0}

    def bursty():
        n["bursty"] += 1
        if n["bursty"] % 2 == 0:
            time.sleep(0.01)

    def steady():
        time.sleep(0.002)

    times = cpu_ms({"bursty": bursty, "steady": steady}, budget_ms=20, most=9)
    assert times["bursty"] < 1.0 < 2.0 <= times["steady"]


def test_tune_model_times_every_rows_bucket_once_per_shape_before_any_step(tuned, monkeypatch):
    """A server tunes before it listens (a 3 s stall inside a request was seen): each (shape, bucket) up
    to max_rows is timed once, shapes shared by layers are timed once, later steps only look up."""
    calls: list = []
    _fake_times(monkeypatch, {"dequant_fp32": 1.0, "cpp": 9.0}, calls)
    same_a, same_b, other = _module(Int4Linear), _module(Int4Linear), _module(Int4Linear, n=64)
    known = auto.tune_model([same_a, same_b, other, nn.Linear(4, 4)], max_rows=20)
    assert known == len(calls) == 2 * 6  # buckets 1, 2, 4, 8, 16, 32 (20 rows) for two shapes
    assert auto.auto_kernel(same_b, torch.randn(3, 128)).name == "dequant_fp32" and len(calls) == 12
    assert auto.auto_kernel(other, torch.randn(64, 128)) is not None and len(calls) == 13  # beyond max_rows
