"""Mixed-precision training: bf16/fp16 lower the loss for every kind of run, fp16 loss scaling skips an
overflowed step and recovers, and unsupported precisions are refused before anything changes."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora, qat
from llmspeed.training import amp

TOKENS = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(0)).repeat(200)
RUN = dict(steps=12, lr=1e-2, seq_len=16, batch_size=4, progress=False)


def fell(losses) -> bool:
    return sum(losses[-3:]) < 0.85 * sum(losses[:3])


def _prepare(model, kind: str) -> dict:
    if kind == "qlora":
        llmspeed.quantize(model, "int4", group_size=16)
    if kind in ("lora", "qlora"):
        lora.add_adapter(model, "a", r=8, alpha=16)
    if kind == "qat":
        qat.prepare(model, "int4", group_size=16, learn_scales=True)
    return {"train": "linears"} if kind == "linears" else {}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["full", "linears", "lora", "qlora", "qat"])
def test_16_bit_training_lowers_the_loss_with_fp32_master_weights(llama, kind, precision):
    options = _prepare(llama, kind)
    result = llmspeed.finetune(llama, TOKENS, precision=precision, **RUN, **options)
    assert result.precision == precision and len(result.losses) == RUN["steps"]
    assert fell(result.losses), result.losses
    assert all(p.dtype == torch.float32 for p in llama.hf.parameters() if p.is_floating_point())


def test_bf16_loss_curve_tracks_fp32():
    curves = {}
    for precision in ("fp32", "bf16"):
        model = llmspeed.models.tiny("llama", seed=0)
        curves[precision] = llmspeed.finetune(model, TOKENS, precision=precision, **RUN).losses
    last = {p: sum(c[-4:]) / 4 for p, c in curves.items()}
    assert abs(last["bf16"] / last["fp32"] - 1) < 0.05, last


def test_qlora_computes_the_4_bit_base_in_bf16_under_autocast(llama):
    llmspeed.quantize(llama, "int4", group_size=16)
    seen = []
    layer = dict(llama.linear_layers())["model.layers.0.self_attn.q_proj"]
    layer.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        llama.hf(torch.tensor([[1, 2, 3]]))
    assert seen == [torch.bfloat16]


def test_fp16_overflow_skips_that_step_and_recovers(llama):
    param = llama.hf.model.layers[0].mlp.up_proj.weight
    calls = {"n": 0}
    snapshots = []

    def poison(grad):  # the third backward pass overflows, as an fp16 activation gradient would
        calls["n"] += 1
        snapshots.append(param.detach().clone())
        return grad * float("inf") if calls["n"] == 3 else grad

    param.register_hook(poison)
    result = llmspeed.finetune(llama, TOKENS, precision="fp16", **RUN)
    assert result.skipped_steps == 1
    assert torch.equal(snapshots[2], snapshots[3])  # the overflowed step changed nothing
    assert not torch.equal(snapshots[3], snapshots[4])  # the next step trained again
    assert fell(result.losses) and all(torch.isfinite(p).all() for p in llama.hf.parameters())


def test_fp16_that_overflows_every_step_warns_that_nothing_trained(llama):
    """Regression: a forward pass that overflows fp16 at every step skipped every step in silence (the result's
    ``skipped_steps`` and inf losses the only trace); the run now warns that the parameters did not change."""
    with torch.no_grad():
        llama.hf.model.layers[0].mlp.down_proj.weight.mul_(1e8)  # its fp16 outputs far past 65504
    before = {n: p.detach().clone() for n, p in llama.hf.named_parameters()}
    with pytest.warns(RuntimeWarning, match="every one of the 12 fp16 steps overflowed .* did not change; train with "
                                            "precision='bf16'"):  # fmt: skip
        result = llmspeed.finetune(llama, TOKENS, precision="fp16", **RUN)
    assert result.skipped_steps == RUN["steps"] == 12
    assert all(torch.equal(p, before[n]) for n, p in llama.hf.named_parameters())


def test_training_leaves_the_callers_random_state_as_it_was(llama):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    llmspeed.finetune(llama, TOKENS, **RUN)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.gpu
def test_training_on_cuda_leaves_the_callers_cuda_random_state_as_it_was(llama):
    """Regression: the loop forked the CPU generator only, and its ``torch.manual_seed`` reseeded every CUDA device:
    after a run on the GPU the caller's CUDA random state was the training seed's."""
    llama.hf.to("cuda")
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    llmspeed.finetune(llama, TOKENS, **RUN)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_fp16_scaler_halves_the_scale_on_overflow():
    mp = amp.MixedPrecision("fp16", "cpu", init_scale=1024.0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    mp.backward((p * torch.tensor([1.0, float("inf"), 1.0])).sum())
    assert mp.step(opt, [p], 1.0) is False and mp.skipped_steps == 1 and mp.loss_scale == 512.0
    assert torch.equal(p.detach(), torch.ones(3))
    opt.zero_grad()
    mp.backward(p.sum())
    assert mp.step(opt, [p], 1.0) is True and not torch.equal(p.detach(), torch.ones(3))


def _state(model):
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


def test_unknown_precision_and_16_bit_master_weights_are_refused_before_anything_changes(llama):
    lora.add_adapter(llama, "a", r=4, alpha=8)
    lora.add_adapter(llama, "b", r=4, alpha=8)
    lora.set_adapter(llama, "a")
    before = _state(llama)
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\]; got 'fp8'"):
        lora.finetune(llama, TOKENS, adapter="b", precision="fp8", **RUN)
    assert lora.active_adapter(llama) == "a"
    assert all(torch.equal(v, before[k]) for k, v in llama.hf.state_dict().items())
    for p in lora.trainable_parameters(llama, "b"):
        p.data = p.data.to(torch.bfloat16)
    before = _state(llama)
    with pytest.raises(ValueError, match="keeps fp32 master weights"):
        lora.finetune(llama, TOKENS, adapter="b", precision="bf16", **RUN)
    assert lora.active_adapter(llama) == "a"
    assert all(torch.equal(v, before[k]) for k, v in llama.hf.state_dict().items())


def test_precision_unsupported_on_the_device_is_refused(llama, monkeypatch):
    monkeypatch.setattr(amp, "unsupported_reason", lambda device, dtype: "no fp16 here" if dtype == torch.float16 else None)
    before = _state(llama)
    with pytest.raises(ValueError, match="precision='fp16' is not supported on cpu: no fp16 here"):
        llmspeed.finetune(llama, TOKENS, precision="fp16", **RUN)
    assert all(torch.equal(v, before[k]) for k, v in llama.hf.state_dict().items())
    assert all(p.requires_grad for p in llama.hf.parameters())


def test_cuda_bf16_support_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "old GPU")
    assert "does not support bf16" in amp.unsupported_reason(torch.device("cuda"), torch.bfloat16)
    assert amp.unsupported_reason(torch.device("cpu"), torch.float16) is None
    # fp16 needs GradScaler, wired for cpu and cuda only; bf16 needs no scaler (torch has autocast for xpu and mps)
    assert "only wired for cpu and cuda, not 'xpu'" in amp.unsupported_reason(torch.device("xpu"), torch.float16)
    assert amp.unsupported_reason(torch.device("mps"), torch.bfloat16) is None


@pytest.mark.parametrize("precision, name", [("bfloat16", "bf16"), (torch.float16, "fp16"), ("float32", "fp32")])
def test_result_names_the_precision_canonically(llama, precision, name):
    """Regression: the result echoed the spelling given ("bfloat16", torch.float16), not one of its names."""
    result = llmspeed.finetune(llama, TOKENS, precision=precision, **{**RUN, "steps": 1})
    assert result.precision == name


@pytest.mark.parametrize(
    "args, match",
    [
        (("fp8", "cpu"), r"precision must be one of \['fp32', 'bf16', 'fp16'\]; got 'fp8'"),
        ((torch.int8, "cpu"), r"precision must be one of .*; got torch.int8"),
        (("fp16", "mps"), r"device_type must be 'cpu' or 'cuda' for fp16 loss scaling; got 'mps'"),
        # regression: accepted, then torch's "Expected one of cpu, cuda, ..." at the first forward pass
        (("bf16", "gpu"), r"device_type must be a device type torch can autocast on .*; got 'gpu'"),
        (("fp32", "gpu"), r"device_type must be a device type torch can autocast on .*; got 'gpu'"),
        # regression: accepted; a scale of 0 (or NaN) skips every step
        (("fp16", "cpu", 0.0), r"init_scale must be a finite number > 0; got 0.0"),
        (("fp16", "cpu", float("nan")), r"init_scale must be a finite number > 0; got nan"),
        (("fp16", "cpu", -1.0), r"init_scale must be a finite number > 0; got -1.0"),
    ],
)
def test_mixed_precision_refuses_bad_arguments_by_name(args, match):
    """Regression: an unknown precision was a bare ``KeyError: 'fp8'``, and fp16 on a device type GradScaler is not
    wired for was accepted."""
    with pytest.raises(ValueError, match=match):
        amp.MixedPrecision(*args)
    assert amp.MixedPrecision("bfloat16", "cpu").precision == "bf16"


def test_fp16_counts_every_overflowed_step_also_once_the_scale_reaches_zero():
    """Regression: a step counted as skipped only when the loss scale fell; after 166 overflows in a row the scale
    is 0 and falls no further, so the later skipped steps (a forward pass that overflows every step) went uncounted."""
    mp = amp.MixedPrecision("fp16", "cpu")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    took = []
    for _ in range(200):
        mp.backward((p * torch.tensor([1.0, float("nan"), 1.0])).sum())
        took.append(mp.step(opt, [p], 1.0))
        opt.zero_grad()
    assert mp.loss_scale == 0.0 and not any(took) and mp.skipped_steps == 200
    assert torch.equal(p.detach(), torch.ones(3))


def test_fp32_precision_trains_a_16_bit_model_in_its_own_dtype(llama):
    """precision='fp32' runs no autocast and keeps no master weights: a model cast to bf16 trains as it is (the
    fp32-master-weight check is for bf16/fp16 autocast only)."""
    llmspeed.cast(llama, "bf16")
    q = llama.hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = llmspeed.finetune(llama, TOKENS, train="linears", precision="fp32", **{**RUN, "steps": 2})
    assert result.precision == "fp32" and len(result.losses) == 2
    assert llama.hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not torch.equal(llama.hf.model.layers[0].self_attn.q_proj.weight, q)
