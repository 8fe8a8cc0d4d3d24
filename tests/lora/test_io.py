"""Adapter files: our round trip, PEFT loads ours, we load PEFT's (fp32 logits within 1e-4)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import llmspeed
from llmspeed import lora

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))


def logits(hf):
    with torch.no_grad():
        return hf(input_ids=IDS).logits


def test_save_load_round_trip(tmp_path, llama):
    lora.add_adapter(llama, "a", r=4, alpha=8, init="random", targets=["q_proj", "o_proj", "up_proj"])
    want = logits(llama.hf)
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["o_proj", "q_proj", "up_proj"]
    fresh = llmspeed.models.tiny("llama", seed=0)
    lora.load_adapter(fresh, folder, "a")
    assert torch.equal(logits(fresh.hf), want)
    lora.load_adapter(llama, folder, "copy")
    assert torch.equal(logits(llama.hf), want)


def test_peft_loads_ours(tmp_path, tiny_model):
    peft = pytest.importorskip("peft")
    lora.add_adapter(tiny_model, "ours", r=4, alpha=16, init="random", use_rslora=True)
    want = logits(tiny_model.hf)
    lora.save_adapter(tiny_model, tmp_path, "ours")
    arch = tiny_model.spec.architecture.removesuffix("ForCausalLM").lower()
    hf = llmspeed.models.tiny(arch, seed=0).hf
    got = logits(peft.PeftModel.from_pretrained(hf, tmp_path))
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("use_rslora", [False, True])  # rsLoRA: scale alpha / sqrt(r) of each layer's own rank
def test_we_load_peft(tmp_path, llama, use_rslora):
    peft = pytest.importorskip("peft")
    hf = llmspeed.models.tiny("llama", seed=0).hf
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        init_lora_weights=False,
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=use_rslora,
    )
    peft_model = peft.get_peft_model(hf, config)
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    lora.load_adapter(llama, tmp_path, "theirs")
    assert (logits(llama.hf) - want).abs().max() < 1e-4
    gate = llama.hf.model.layers[0].mlp.gate_proj
    assert gate.lora_A["theirs"].out_features == 2
    assert gate.scaling["theirs"] == pytest.approx(12 / math.sqrt(2) if use_rslora else 12 / 2)
    # and the round trip through our writer keeps the per-layer ranks and alphas
    lora.save_adapter(llama, tmp_path / "again", "theirs")
    again = peft.PeftModel.from_pretrained(llmspeed.models.tiny("llama", seed=0).hf, tmp_path / "again")
    assert (logits(again) - want).abs().max() < 1e-4


def _state(model):
    layers = [(n, type(m).__name__) for n, m in model.linear_layers()]
    grads = [p.requires_grad for p in model.module.parameters()]
    return layers, grads, lora.adapter_names(model), lora.active_adapter(model)


def test_load_adapter_refuses_integer_dtype_and_leaves_model_usable(tmp_path, llama):
    # regression: dtype=torch.int8 left an empty wrapped layer behind, and a later quantize/save broke
    lora.add_adapter(llama, "a", r=4, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    fresh = llmspeed.models.tiny("llama", seed=0)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype.*torch.int8"):
        lora.load_adapter(fresh, folder, "b", dtype=torch.int8)
    assert _state(fresh) == before
    llmspeed.quantize(fresh, "int4", group_size=32)
    llmspeed.save(fresh, tmp_path / "q")
    lora.load_adapter(fresh, folder, "b", dtype=torch.bfloat16)  # a float dtype still works afterwards
    assert lora.adapter_names(fresh) == ["b"]


def test_load_adapter_is_all_or_nothing_when_a_layer_fails(tmp_path, llama, monkeypatch):
    from llmspeed.lora.layer import LoraLinear

    lora.add_adapter(llama, "a", r=4, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    fresh = llmspeed.models.tiny("llama", seed=0)
    lora.add_adapter(fresh, "keep", r=2, targets=["q_proj"])
    before = _state(fresh)
    want = logits(fresh.hf)
    calls = {"n": 0}
    original = LoraLinear.add

    def failing_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # some positions already carry the new adapter
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        lora.load_adapter(fresh, folder, "b")
    assert calls["n"] == 5
    assert _state(fresh) == before
    assert all("b" not in layer.lora_A for _, layer in lora.lora_layers(fresh))
    assert torch.equal(logits(fresh.hf), want)


@pytest.mark.parametrize("field", ["use_rslora", "use_dora", "fan_in_fan_out"])
@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_boolean_fields_must_be_json_booleans(tmp_path, llama, field, value):
    """bool() read the string "no" as True (rsLoRA switched on; DoRA and fan_in_fan_out refused as if set):
    only true/false are taken now, and the error names the field and the value."""
    lora.add_adapter(llama, "a", r=4, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(dict(cfg, **{field: value})))
    fresh = llmspeed.models.tiny("llama", seed=0)
    before = _state(fresh)
    with pytest.raises(ValueError, match=rf"adapter_config.json field {field} must be a JSON boolean .*got {value!r}"):
        lora.load_adapter(fresh, folder, "a")
    assert _state(fresh) == before
    path.write_text(json.dumps(dict(cfg, **{field: False})))
    assert lora.load_adapter(fresh, folder, "a").use_rslora is False


def test_save_adapter_into_a_file_or_a_non_path_names_the_argument(tmp_path, llama):
    lora.add_adapter(llama, "a", r=4, init="random")
    file = tmp_path / "adapter.bin"
    file.write_bytes(b"keep")
    with pytest.raises(ValueError, match=rf"path must be a folder \(created if needed\); got '{file}', but '{file}' is a file"):
        lora.save_adapter(llama, file, "a")
    assert file.read_bytes() == b"keep"
    with pytest.raises(TypeError, match="path must be a folder path .*; got None"):
        lora.save_adapter(llama, None, "a")
    with pytest.raises(TypeError, match="path must be a folder path .*; got None"):
        lora.load_adapter(llmspeed.models.tiny("llama", seed=0), None, "b")


@pytest.mark.parametrize(
    "field, value", [("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 1], [0, 1]])]
)
def test_peft_adapters_that_compute_something_else_are_refused(tmp_path, llama, field, value):
    """Regression: an activated LoRA (applied only after its invocation tokens) and one trained on replicated
    layers loaded as plain LoRA on every token and layer: logits silently unlike PEFT's."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM", **{field: value})  # fmt: skip
    peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config).save_pretrained(tmp_path)
    before, want = _state(llama), logits(llama.hf)
    with pytest.raises(ValueError, match=re.escape(f"adapter_config.json field {field}={value!r} is not supported")):
        lora.load_adapter(llama, tmp_path, "theirs")
    assert _state(llama) == before and torch.equal(logits(llama.hf), want)


def test_a_qa_lora_adapter_is_refused_by_its_field(tmp_path, llama):
    """Regression: PEFT's QA-LoRA (use_qalora on a GPTQ base) stores lora_A [r, in / qalora_group_size], as it averages
    each group of inputs first; llmspeed refused it as a shape mismatch asking whether it was trained for another model."""
    from safetensors.torch import save_file

    lora.add_adapter(llama, "a", r=4, init="random", targets=["q_proj"])
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), use_qalora=True, qalora_group_size=16)))
    prefix = "base_model.model.model.layers"
    save_file({f"{prefix}.{i}.self_attn.q_proj.{m}.weight": torch.randn(shape) for i in range(2)
               for m, shape in [("lora_A", (4, 64 // 16)), ("lora_B", (64, 4))]}, str(folder / "adapter_model.safetensors"))
    fresh = llmspeed.models.tiny("llama", seed=0)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"field use_qalora=True is not supported: QA-LoRA averages each group of "
                                         r"qalora_group_size=16 inputs before lora_A \(here \(4, 4\)"):
        lora.load_adapter(fresh, folder, "b")
    assert _state(fresh) == before


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, "field r: r must be a positive integer .*got 0"),
        ("r", -3, "field r: r must be a positive integer .*got -3"),
        ("lora_dropout", 1.5, r"field lora_dropout: dropout must be a number in \[0, 1\); got 1.5"),
        ("lora_dropout", None, "fields r, lora_alpha and lora_dropout must be numbers .*lora_dropout=None"),
        # these loaded: true as alpha 1.0, strings through float(), r=4.5 cut to 4
        ("lora_alpha", True, "fields r, lora_alpha and lora_dropout must be numbers .*lora_alpha=True"),
        ("lora_alpha", "16", "fields r, lora_alpha and lora_dropout must be numbers .*lora_alpha='16'"),
        ("lora_dropout", "0.1", "fields r, lora_alpha and lora_dropout must be numbers .*lora_dropout='0.1'"),
        ("r", 4.5, r"fields r, lora_alpha and lora_dropout must be numbers \(r an integer\); got r=4.5"),
        ("r", True, "fields r, lora_alpha and lora_dropout must be numbers .*got r=True"),
        ("r", "4", "fields r, lora_alpha and lora_dropout must be numbers .*got r='4'"),
        # these loaded: a NaN gave NaN logits, a string a bare "could not convert string to float"
        ("alpha_pattern", {"q_proj": float("nan")}, "field alpha_pattern must map .* finite numbers; got 'q_proj': nan"),
        ("alpha_pattern", {"q_proj": "32"}, "field alpha_pattern must map .* finite numbers; got 'q_proj': '32'"),
    ],
)
def test_config_values_out_of_range_name_the_file_and_field(tmp_path, llama, field, value, message):
    """Regression: r=0 or lora_dropout=1.5 in adapter_config.json raised LoraConfig's message without the file,
    and lora_dropout=null a bare TypeError from float()."""
    lora.add_adapter(llama, "a", r=4, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{field: value})))
    fresh = llmspeed.models.tiny("llama", seed=0)
    before = _state(fresh)
    with pytest.raises(ValueError, match=rf"adapter_config.json {message}"):
        lora.load_adapter(fresh, folder, "a")
    assert _state(fresh) == before and lora.adapter_names(fresh) == []


@pytest.mark.parametrize("change, message", [
    ({"r": 8}, "field r gives it rank 8"), ({"rank_pattern": {"gate_proj": 2}}, "field rank_pattern gives it rank 2"),
])  # fmt: skip
def test_a_config_whose_ranks_are_not_the_tensors_is_refused(tmp_path, llama, change, message):
    """Regression: the tensors' rank was taken whatever r or rank_pattern said, so a file claiming r=8 over rank-4
    matrices loaded with the scale alpha / 4 where PEFT refuses the size mismatch (docs/lora.md: "an adapter file
    that is not what it claims")."""
    lora.add_adapter(llama, "a", r=4, init="random")
    folder = lora.save_adapter(llama, tmp_path / "a", "a")
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    fresh = llmspeed.models.tiny("llama", seed=0)
    before = _state(fresh)
    with pytest.raises(ValueError, match=rf"has rank 4, but .*adapter_config.json {message}"):
        lora.load_adapter(fresh, folder, "a")
    assert _state(fresh) == before and lora.adapter_names(fresh) == []


def test_adapter_with_dropout_on_an_eval_model_matches_peft(tmp_path, llama):
    """Regression: the wrappers and dropout modules that add_adapter/load_adapter created started in training
    mode, so on a model in eval mode an adapter with lora_dropout > 0 dropped activations at inference
    (logits random from call to call, unlike PEFT's)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config).eval()
    theirs.save_pretrained(tmp_path)
    lora.load_adapter(llama, tmp_path, "theirs")
    assert (logits(llama.hf) - logits(theirs)).abs().max() < 1e-4
    lora.add_adapter(llama, "ours", r=4, init="random", dropout=0.5, targets=["q_proj", "o_proj"])
    assert torch.equal(logits(llama.hf), logits(llama.hf))
    assert not any(m.training for m in llama.hf.modules())
    llama.hf.train()
    assert llama.hf.get_submodule("model.layers.0.self_attn.o_proj").lora_dropout["ours"].training


def test_adapter_dropout_in_training_drops_the_same_inputs_as_peft(tmp_path, llama):
    """Golden: in training mode, ``W x + scale * B A dropout(x)`` draws the same dropout masks as PEFT from the same
    seed, so the logits match; they differ from the eval logits (the dropout really applies)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config)
    theirs.save_pretrained(tmp_path)
    lora.load_adapter(llama, tmp_path, "theirs")
    evaluated = logits(llama.hf)
    llama.hf.train(), theirs.train()
    torch.manual_seed(5)
    ours = logits(llama.hf)
    torch.manual_seed(5)
    assert (ours - logits(theirs)).abs().max() < 1e-4
    assert (ours - evaluated).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_adapters_of_a_changed_base_are_refused_unless_converted(tmp_path, llama, init):
    """Regression: PiSSA and OLoRA adapters (trained on W - scale * B0 A0, a base PEFT rebuilds while loading)
    loaded as plain LoRA on the original base: logits silently unlike PEFT's. They are refused by name now, and
    the plain LoRA PEFT converts them to loads with PEFT's logits."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    theirs = peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config)
    with torch.no_grad():
        theirs.save_pretrained(tmp_path / "init")  # the initial adapter, for the conversion below
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))  # "trained"
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "raw")
    before, base = _state(llama), logits(llama.hf)
    with pytest.raises(ValueError, match=rf"field init_lora_weights='{init}' is not supported: .*path_initial_model"):
        lora.load_adapter(llama, tmp_path / "raw", "raw")
    assert _state(llama) == before and torch.equal(logits(llama.hf), base)
    theirs.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    lora.load_adapter(llama, tmp_path / "plain", "plain")
    assert (logits(llama.hf) - want).abs().max() < 1e-4


def test_lora_variants_are_refused_by_the_field_that_makes_them(tmp_path, llama):
    """Regression: a BD-LoRA adapter (block-diagonal A) was refused as if "trained for another model" (a shape
    error) and a KaSA one as a file holding a stray tensor: the error now names the PEFT field."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    variants = {
        "use_bdlora": BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2),
        "kasa_config": KasaConfig(),
    }
    before, want = _state(llama), logits(llama.hf)
    for field, value in variants.items():
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], **{field: value})
        peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config).save_pretrained(tmp_path / field)
        with pytest.raises(ValueError, match=rf"adapter_config.json field {field}=.* is not supported"):
            lora.load_adapter(llama, tmp_path / field, "theirs")
        assert _state(llama) == before and torch.equal(logits(llama.hf), want)


def test_alpha_pattern_of_target_parameters_adapters_matches_peft(tmp_path, llama):
    """Regression: PEFT matches alpha_pattern against the parameter's name (``...down_proj.weight``) for layers
    it wrapped through target_parameters; load_adapter matched the module name, so ``{"down_proj": 5}`` (which
    PEFT ignores there) set the scale and ``{"up_proj.weight": 3}`` (which PEFT applies) did not: logits
    silently unlike PEFT's."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.down_proj.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight"],
                             alpha_pattern={"down_proj": 5, "up_proj.weight": 3})  # fmt: skip
    theirs = peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config)
    theirs.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(llmspeed.models.tiny("llama", seed=0).hf, tmp_path)
    want = logits(again)
    lora.load_adapter(llama, tmp_path, "theirs")
    assert (logits(llama.hf) - want).abs().max() < 1e-4
    mlp = llama.hf.model.layers[0].mlp
    assert mlp.down_proj.scaling["theirs"] == 8 / 4 and mlp.up_proj.scaling["theirs"] == 3 / 4


def test_peft_adapter_on_lm_head_names_save_embedding_layers(tmp_path, llama):
    """Regression: PEFT saves lm_head's base weight beside an adapter whose target_modules name lm_head
    (save_embedding_layers, on by default then); load_adapter refused the file only as holding a tensor that
    "is not a LoRA matrix of a linear layer", which did not say why nor how to get a file it loads. The error
    names the option now, and the file PEFT saves without it loads with PEFT's logits."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    theirs = peft.get_peft_model(llmspeed.models.tiny("llama", seed=0).hf, config)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path / "default")
    before, base = _state(llama), logits(llama.hf)
    with pytest.raises(ValueError, match=r"'base_model.model.lm_head.base_layer.weight', a base weight .*"
                                         r"save_pretrained\(path, save_embedding_layers=False\)"):  # fmt: skip
        lora.load_adapter(llama, tmp_path / "default", "theirs")
    assert _state(llama) == before and torch.equal(logits(llama.hf), base)
    theirs.save_pretrained(tmp_path / "lora_only", save_embedding_layers=False)
    lora.load_adapter(llama, tmp_path / "lora_only", "theirs")
    assert (logits(llama.hf) - logits(theirs)).abs().max() < 1e-4


def test_save_adapter_waits_for_a_step_in_flight(tmp_path, llama):
    """Regression: ``save_adapter`` took no step lock, so a save from one thread while another changed the adapter
    (a step's routing, training, a merge) could write a half-changed adapter. It now waits for the lock's holder."""
    import threading

    from llmspeed.protocol import step_lock

    lora.add_adapter(llama, "a", r=4, alpha=8, init="random")
    saved = []
    with step_lock(llama.module):
        saver = threading.Thread(target=lambda: saved.append(lora.save_adapter(llama, tmp_path / "a", "a")))
        saver.start()
        saver.join(0.3)
        assert saver.is_alive() and not (tmp_path / "a").exists()  # waiting for the holder
    saver.join(30)
    assert not saver.is_alive() and (saved[0] / "adapter_model.safetensors").exists()
