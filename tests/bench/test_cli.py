"""The bench harness: suites run in one process, tables are printed, results.json and PNGs are written."""

from __future__ import annotations

import json
import sys
import types

import pytest

from llmspeed.bench import cli


def test_precision_suite_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main(["precision", "--model", "tiny-llama", "--quick", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "python -m llmspeed bench precision --model tiny-llama --quick" in printed
    assert "| variant | baseline |" in printed and "| fp32 | fp32 |" in printed
    payload = json.loads((out / "results.json").read_text())
    assert payload["suites"]["precision"]["status"] == "ok"
    rows = payload["suites"]["precision"]["rows"]
    model_rows = {r["variant"]: r for r in rows if r["table"] == "precision/model"}
    # the last two: CPU only
    assert set(model_rows) == {"fp32", "bf16", "fp16", "autocast-bf16", "bf16-native", "bf16-16bit-activations"}
    assert model_rows["fp32"]["decode_speedup"] == 1.0
    # casting to 16 bits halves the bytes of the weights (norms stay fp32, a tiny share)
    assert 0.49 < model_rows["bf16"]["memory_vs_base"] < 0.52
    assert model_rows["autocast-bf16"]["memory_vs_base"] == 1.0
    assert all(r["decode_step_ms"] > 0 for r in model_rows.values())
    matmul = [r for r in rows if r["table"] == "precision/matmul"]
    assert {r["dtype"] for r in matmul} == {"fp32", "bf16", "fp16", "bf16-upcast"} and all(r["GFLOP/s"] > 0 for r in matmul)
    assert sorted(payload["plots"]["precision"]) == ["precision_matmul.png", "precision_model.png"]
    for name in payload["plots"]["precision"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### precision/model" in (out / "results.md").read_text()
    assert payload["machine"]["torch"]


@pytest.fixture
def fake_suites(monkeypatch):
    """Two suites plugged in: one that works, one that raises."""
    good = types.ModuleType("llmspeed.bench.fake_good")
    good.run = lambda *, device, model, quick, progress: [
        {"table": "fake", "x": "a", "tok/s": 2.0},
        {"table": "fake", "x": "b", "tok/s": 3.0},
    ]
    bad = types.ModuleType("llmspeed.bench.fake_bad")

    def boom(**kwargs):
        raise RuntimeError("kernel exploded")

    bad.run = boom
    monkeypatch.setitem(sys.modules, good.__name__, good)
    monkeypatch.setitem(sys.modules, bad.__name__, bad)
    monkeypatch.setattr(cli, "SUITES", ("fake_good", "fake_missing", "fake_bad"))


def test_missing_and_failing_suites_are_reported_not_dropped(fake_suites, tmp_path, capsys):
    status = cli.main(["all", "--quick", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert status == 1
    suites = json.loads((tmp_path / "results.json").read_text())["suites"]
    assert suites["fake_good"]["status"] == "ok" and suites["fake_good"]["rows"][0]["tok/s"] == 2.0
    assert suites["fake_missing"]["status"] == "missing"
    assert suites["fake_bad"]["status"] == "failed"
    assert "kernel exploded" in suites["fake_bad"]["error"]
    assert "**missing**" in printed.out and "**failed**: RuntimeError: kernel exploded" in printed.out
    assert "fake_missing (missing)" in printed.err
    assert (tmp_path / "fake.png").exists()


def test_a_suite_without_rows_says_so():
    """Regression: a suite that returned no rows printed its heading and command line only."""
    block = cli.suite_markdown("empty", {"status": "ok", "seconds": 1.0, "rows": [], "error": None}, "cmd")
    assert block.startswith("## empty") and "returned no rows: nothing to show" in block


def test_unknown_suite_and_model_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    assert "invalid choice" in capsys.readouterr().err
    result = cli.run_suite("precision", "cpu", "no/such/folder", True, False)
    assert result["status"] == "failed" and "model must be one of" in result["error"]


def test_out_that_is_a_file_is_refused_before_any_suite_runs(fake_suites, tmp_path, capsys):
    """Regression: --out naming a file ran every suite, then died in mkdir with a bare FileExistsError."""
    file = tmp_path / "results.txt"
    file.write_text("keep")
    for out in (file, file / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["all", "--quick", "--out", str(out)])
        assert exit_info.value.code == 2
        printed = capsys.readouterr()
        assert f"--out must be a folder (created if needed); got '{out}', but '{file}' is a file" in printed.err
        assert "[bench] running" not in printed.err and printed.out == ""
    assert file.read_text() == "keep"


def test_jsonable_turns_tensors_and_nan_into_json_values():
    import torch

    row = cli._jsonable({"a": torch.tensor(1.5), "b": float("nan"), "c": torch.float16, "d": (1, 2)})
    assert row == {"a": 1.5, "b": None, "c": "torch.float16", "d": [1, 2]}
    json.dumps(row)


@pytest.mark.parametrize("model, says", [("no/such/folder", "got 'no/such/folder', not a folder"),
                                         ("tiny-gpt", "tiny-<arch> takes arch in"), ("smolm2", "must be one of"),
                                         ("smollm2-shape-gpt", "smollm2-shape-<arch> takes arch in")])
def test_unknown_model_is_refused_before_any_suite_runs(fake_suites, model, says, monkeypatch, capsys):
    """Regression: a misspelt --model ran every suite, each failing in turn (those that ignore --model ran in full);
    a benchmarks/<suite>.py script died with a traceback from the suite."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["all", "--quick", "--model", model])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "error: --model " in printed.err and says in printed.err and "[bench] running" not in printed.err
    from llmspeed.bench import script

    def no_run(**kwargs):
        raise AssertionError("the suite ran")

    monkeypatch.setattr(sys, "argv", ["formats.py", "--model", model])
    with pytest.raises(SystemExit) as exit_info:
        script.main(no_run, "doc")
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_accepted_model_names_pass_the_early_check(tmp_path):
    from llmspeed.bench.models import name_error

    for name in ("smollm2", "llama-1b-random", "tiny", "tiny-qwen3", "smollm2-shape-phi3", str(tmp_path)):
        assert name_error(name) is None, name


def test_smollm2_shaped_models_have_smollm2s_sizes_in_any_family():
    from llmspeed.bench import models as bench_models

    real = bench_models.load_model("smollm2", "cpu").spec
    for arch in ("llama", "phi3"):
        spec = bench_models.load_model(f"smollm2-shape-{arch}", "cpu").spec
        assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (
            real.num_layers, real.hidden_size, real.num_heads, real.num_kv_heads, real.vocab_size), arch
        assert spec.architecture.lower().startswith(arch)


def test_every_name_the_early_check_accepts_loads(monkeypatch):
    """Regression: ``name_error`` accepted ``tiny`` and ``llama1b`` while the shared ``load_model`` refused them, so a
    suite that uses it failed after the CLI had let the name through (noted by the benchmark audit)."""
    import llmspeed.models
    from llmspeed.bench import models as bench_models

    assert bench_models.name_error("tiny") is None and bench_models.name_error("llama1b") is None
    tiny = bench_models.load_model("tiny", "cpu")
    assert tiny.spec.num_layers == bench_models.load_model("tiny-llama", "cpu").spec.num_layers
    calls: list = []
    monkeypatch.setattr(llmspeed.models, "llama_1b_random", lambda **kw: calls.append(kw) or "1B")  # not built here
    assert bench_models.load_model("llama1b", "cpu") == "1B" and len(calls) == 1


def test_suite_files_missing_numbers_cuda_and_broken_imports(fake_suites, tmp_path, monkeypatch, capsys):
    """<suite>.md per suite, None shown as n/a, --device cuda without CUDA refused (2), and a suite whose own
    import fails on another module is 'failed', not 'missing'."""
    sys.modules["llmspeed.bench.fake_good"].run = lambda **kw: [{"table": "fake", "x": "a", "tok/s": None}]
    assert cli.main(["fake_good", "--no-progress", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "fake_good.md").read_text()
    assert page.startswith("`python -m llmspeed bench fake_good") and "| a | n/a |" in page
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    assert cli.main(["fake_good", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err

    def broken(name):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    result = cli.run_suite("fake_good", "cpu", "smollm2", True, False)
    assert result["status"] == "failed" and "scipy" in result["error"]


class _Loaded(BaseException):
    """Raised by a stand-in load_model (past any ``except Exception`` of a suite)."""


_NO_BAR = {  # what each suite runs first that loads the --model, with progress off
    "precision": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
    "lora": lambda m: m.inference_rows("tiny-llama", "cpu", {}, False),
    "lora-interop": lambda m: m.interop_rows("tiny-llama", "cpu", {}, False),
    "lora-child": lambda m: m.train_config("full-fp32", "tiny-llama", "cpu", {}),
    "serving": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
    "training-child": lambda m: m.train_one("full", "fp32", "tiny-llama", "cpu", {}),
    "qat": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
    "lora_decode": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
    "mixed_steps": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
    "decode_attention": lambda m: m.run(model="tiny-llama", quick=True, progress=False),
}


@pytest.mark.parametrize("case", sorted(_NO_BAR))
def test_no_progress_reaches_the_model_loading_of_every_suite(case, monkeypatch):
    """Regression: these suites called ``load_model`` without their ``progress`` flag, so ``--model PATH
    --no-progress`` still drew transformers' loading bar (the children of lora and training, whose stderr is
    captured, load without one)."""
    import importlib
    import inspect

    from llmspeed.bench.models import load_model

    module = importlib.import_module(f"llmspeed.bench.{case.split('-')[0]}")
    seen: list[bool] = []

    def loaded(*args, **kwargs):
        seen.append(inspect.signature(load_model).bind(*args, **kwargs).arguments.get("progress", True))
        raise _Loaded  # stop the suite here: only the load is checked

    monkeypatch.setattr(module, "load_model", loaded)
    with pytest.raises(_Loaded):
        _NO_BAR[case](module)
    assert seen == [False]
