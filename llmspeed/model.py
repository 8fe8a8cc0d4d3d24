"""``llmspeed.Model``: the :class:`~llmspeed.protocol.CausalLM` wrapper for transformers models.

The wrapper owns no weights: ``model.hf`` is the transformers module itself, and the
other llmspeed modules replace its linear layers in place through
:meth:`Model.replace_linear`. The ragged forward pass plugs an external KV cache into
transformers' attention interface (``AttentionInterface``), so every decoder-only family
that routes attention through that interface runs unmodified, except those that ask it for more than
scaled causal attention (Gemma-2's soft-capping, gpt-oss's sinks), which the ragged pass refuses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .protocol import AttentionBackend, ModelSpec, base_linear, is_quantized, step_lock
from .ragged_attention import (
    ATTENTION_LAYERS,
    ATTN_IMPLEMENTATION,
    BACKEND_KWARG,
    check_ragged,
    layer_kinds,
    register_attention,
)

if TYPE_CHECKING:
    from .generation import GenerationOutput, SamplingParams

def _check_supported(hf: Any) -> None:
    """Raise ``TypeError`` naming the class when ``hf`` is not a supported decoder-only causal LM."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(hf).__name__
    if not isinstance(hf, PreTrainedModel):
        raise TypeError(
            f"hf_model must be a transformers PreTrainedModel causal LM; got {type(hf).__module__}.{name}"
            f"{_wrapper_hint(hf)}"
        )
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if getattr(hf.config, "is_encoder_decoder", False) or name not in causal_classes:
        raise TypeError(
            f"hf_model must be a decoder-only causal LM (an AutoModelForCausalLM class such as "
            f"LlamaForCausalLM); got {name}"
        )
    if not getattr(type(hf), "_supports_attention_backend", False):
        raise TypeError(
            f"{name} does not route attention through transformers' AttentionInterface, which llmspeed "
            f"needs to plug in its KV cache; supported: decoder-only models with "
            f"_supports_attention_backend=True (Llama, Qwen2, Qwen3, Mistral, Phi3, Gemma, OLMo, ...)"
        )
    others = sorted(layer_kinds(hf.config) - ATTENTION_LAYERS)
    if others:
        raise TypeError(
            f"{name} has {', '.join(map(repr, others))} layers (its config's layer types), which keep a state other "
            f"than keys and values or attend to a selection of them: llmspeed's paged KV cache would compute other "
            f"outputs; supported: models whose every layer is {', '.join(sorted(ATTENTION_LAYERS))}"
        )



def _wrapper_hint(obj: Any) -> str:
    """What to pass instead of a transformers model that another library wrapped (PEFT, ``torch.compile``)."""
    if callable(getattr(obj, "merge_and_unload", None)) or callable(getattr(obj, "get_base_model", None)):
        return (" (a PEFT model: pass peft_model.merge_and_unload() to fold the adapter in, or the base model "
                "with the adapter folder loaded by llmspeed.lora.load_adapter(model, path, name))")  # fmt: skip
    if isinstance(getattr(obj, "_orig_mod", None), nn.Module):
        return " (a torch.compile'd model: pass the model it compiled, compiled._orig_mod)"
    return ""


def _check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    if tokenizer is None:
        return
    if not callable(getattr(tokenizer, "encode", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer; got {type(tokenizer).__name__}")
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer does not match the model: it has {n} tokens but the model's vocabulary has "
            f"{vocab_size} rows; pass the tokenizer that was saved with this model"
        )


class Model:
    """A transformers causal LM wrapped for llmspeed (implements :class:`~llmspeed.protocol.CausalLM`).

    Args:
        hf: A decoder-only ``transformers`` causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...).
        tokenizer: Its tokenizer, or ``None`` when only token ids are used.

    Attributes:
        hf: The transformers module; llmspeed modules replace its layers in place.
        tokenizer: The tokenizer given.
    """

    def __init__(self, hf: nn.Module, tokenizer: Any = None):
        _check_supported(hf)
        config: Any = hf.config  # a transformers PretrainedConfig (nn.Module types its attributes as tensors)
        _check_tokenizer(tokenizer, config.get_text_config().vocab_size)
        register_attention()
        self.hf: Any = hf  # a transformers PreTrainedModel: typed loosely so its config and methods type-check
        self.tokenizer = tokenizer
        self._linear_names = _linear_positions(hf)
        self._linear_set = frozenset(self._linear_names)
        self._runs = threading.RLock()  # generate_batched / stream calls take turns on the kept generator

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"llmspeed.Model({s.architecture}, layers={s.num_layers}, hidden={s.hidden_size}, "
            f"dtype={str(s.dtype).removeprefix('torch.')}, device={s.device})"
        )

    # --- protocol: spec and module ------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The root ``nn.Module``: the same object as :attr:`hf`."""
        return self.hf

    @property
    def spec(self) -> ModelSpec:
        """Shapes from the config; dtype and device from the input embedding as it is now."""
        cfg = self.hf.config.get_text_config()
        heads = cfg.num_attention_heads
        emb = self.hf.get_input_embeddings()
        reference = getattr(emb, "dtype_reference", None)  # a quantized tied embedding has no float weight
        emb = emb.weight if reference is None else reference
        return ModelSpec(
            architecture=type(self.hf).__name__,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_positions=getattr(cfg, "max_position_embeddings", None) or 2048,
            dtype=emb.dtype,
            device=emb.device,
        )

    # --- protocol: linear layers --------------------------------------------------------------
    def linear_names(self) -> list[str]:
        """Qualified names of the linear positions found at wrap time (output head included)."""
        return list(self._linear_names)

    def linear_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for each linear position, whatever module sits there now."""
        for name in self._linear_names:
            yield name, self.hf.get_submodule(name)

    def replace_linear(self, name: str, module: nn.Module) -> nn.Module:
        """Swap the module at linear position ``name`` for ``module``; return the old one.

        Raises:
            ValueError: ``name`` is not a linear position, or ``module``'s ``in_features``/``out_features``
                differ from the layer's there (the model is left unchanged).
        """
        if name not in self._linear_set:
            raise ValueError(
                f"name must be a linear position of this model; got {name!r}. "
                f"Known positions include: {', '.join(self._linear_names[:6])}, ..."
            )
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = self.hf.get_submodule(parent_name) if parent_name else self.hf
        old = getattr(parent, child)
        shape = lambda m: (getattr(m, "in_features", None), getattr(m, "out_features", None))  # noqa: E731
        if None not in shape(old) + shape(module) and shape(module) != shape(old):
            raise ValueError(
                f"module for {name!r} maps {shape(module)[0]} -> {shape(module)[1]} features, but the layer there "
                f"maps {shape(old)[0]} -> {shape(old)[1]}; pass a module of the same in_features and out_features"
            )
        setattr(parent, child, module)
        return old

    # --- protocol: ragged forward -------------------------------------------------------------
    @contextmanager
    def _attention_implementation(self, name: str):
        cfg = self.hf.config
        previous = cfg._attn_implementation
        cfg._attn_implementation = name
        try:
            yield
        finally:
            cfg._attn_implementation = previous

    def forward_batch(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attention: AttentionBackend,
        logits_indices: torch.Tensor,  # [N]
    ) -> torch.Tensor:  # [N, vocab]
        """Run a flat ragged batch against ``attention``'s KV cache; return logits at ``logits_indices``.

        Holds the model's :func:`~llmspeed.protocol.step_lock`: the attention implementation is switched in the
        shared config for the call, so two calls from two threads take turns.
        """
        check_ragged(input_ids, positions, logits_indices)
        with step_lock(self.hf), self._attention_implementation(ATTN_IMPLEMENTATION):
            out = self.hf(
                input_ids=input_ids[None],  # [1, T]
                position_ids=positions[None],  # [1, T]
                use_cache=False,
                logits_to_keep=logits_indices,
                **{BACKEND_KWARG: attention},
            )
        return out.logits[0]  # [N, vocab]

    def __getstate__(self) -> dict[str, Any]:
        """``copy.deepcopy`` and pickling leave the kept generator behind: it holds a lock, the KV cache and the
        C++ step's handle (a copy made after ``generate_batched`` failed on them); the copy builds its own."""
        state = self.__dict__.copy()
        state.pop("_cached_generator", None)
        state["_runs"] = None  # a lock does not copy: the copy makes its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runs = threading.RLock()

    # --- generation (the batching generator lives in llmspeed.generation) ----------------------
    def _generator(self, generator_kwargs: dict[str, Any]) -> Any:
        """The model's reusable Generator: rebuilt only when the arguments, the model's modules or its tokenizer change.

        A fresh generator zero-fills a new KV cache (and recaptures CUDA graphs), so repeated small calls
        would pay that every time. ``progress`` and the end-of-sequence ids (``generation_config.eos_token_id`` and
        the tokenizer's, unless ``eos_token_ids`` is given) are read per call. After tensors changed in place (training),
        the kept generator's prefix cache, keys and values of the old weights, is reset.
        """
        from .generation import Generator

        kwargs = dict(generator_kwargs)
        progress = kwargs.pop("progress", True)
        key = (repr(sorted(kwargs.items())), self._fingerprint())
        versions = tuple(t._version for t in (*self.hf.parameters(), *self.hf.buffers()))
        cached = getattr(self, "_cached_generator", None)
        retokenized = cached is not None and cached[1].tokenizer is not self.tokenizer  # llmspeed.wrap(model, tokenizer)
        if cached is None or cached[0] != key or retokenized:
            generator = Generator(self, progress=progress, **kwargs)
            # read again: a CPU generator moves the weights into 2 MiB pages (llmspeed.huge_pages) as it is built
            key, versions = (key[0], self._fingerprint()), tuple(t._version for t in (*self.hf.parameters(), *self.hf.buffers()))
            cached = self._cached_generator = (key, generator, versions)
        elif cached[2] != versions:
            cached[1].blocks.reset_prefix_cache()
            cached = self._cached_generator = (key, cached[1], versions)
        cached[1].progress = progress
        if kwargs.get("eos_token_ids") is None:  # generation_config or tokenizer eos edited since: read them again
            from .generation.prompts import eos_ids

            cached[1].eos_token_ids = frozenset(eos_ids(self))
        return cached[1]

    def _fingerprint(self) -> tuple:
        """Identity of what a generator depends on: every module and every tensor's storage and dtype."""
        modules = tuple(id(m) for m in self.hf.modules())
        tensors = tuple((t.data_ptr(), t.dtype, t.device) for t in (*self.hf.parameters(), *self.hf.buffers()))
        return modules, tensors

    def generate_batched(
        self,
        prompts: Sequence[str | Sequence[int] | Sequence[dict]],
        sampling: SamplingParams | Sequence[SamplingParams] | dict | None = None,
        **generator_kwargs: Any,
    ) -> list[GenerationOutput]:
        """Generate for every prompt with continuous batching; results in prompt order.

        A prompt is a list of chat messages (``[{"role": "user", "content": ...}]``: the tokenizer's chat
        template is applied, as in transformers' pipelines and vLLM's ``LLM.chat``), a string (continued as
        raw text, as vLLM's ``LLM.generate`` does, unless ``chat_template=True``) or a list of token ids.
        Instruct models such as SmolLM2-Instruct want chat messages.

        ``generator_kwargs`` go to :class:`llmspeed.Generator` (KV budget, token budget, progress), except
        :class:`SamplingParams` fields (``max_new_tokens=8``, ``temperature=...``), which build ``sampling``
        as transformers and vLLM users expect. One generator is kept per model and reused while the
        arguments and the model's modules stay the same; calls from several threads take turns on it (to serve
        callers concurrently, batched together, use :class:`llmspeed.Engine`).
        """
        sampling = _sampling_from_kwargs(sampling, generator_kwargs)
        with self._runs:  # calls from several threads take turns (the kept generator is single-threaded)
            return self._generator(generator_kwargs).generate_batched(prompts, sampling)

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        **generator_kwargs: Any,
    ) -> Iterator[Any]:
        """Yield per-token events (with their new text) as the continuous-batching generator produces them.

        Calls from other threads (``generate_batched`` too) wait until the stream ends or is closed; to serve
        callers concurrently, use :class:`llmspeed.Engine`."""
        sampling = _sampling_from_kwargs(sampling, generator_kwargs)
        with self._runs:
            yield from self._generator(generator_kwargs).stream(prompts, sampling)


def _sampling_from_kwargs(sampling: Any, kwargs: dict[str, Any]) -> Any:
    """Move ``SamplingParams`` fields out of ``kwargs`` (in place) into ``sampling``."""
    from .generation.sampling import split_sampling_kwargs

    fields = split_sampling_kwargs(kwargs)
    _check_generator_kwargs(kwargs)
    if not fields:
        return sampling
    if sampling is not None:
        raise ValueError(
            f"give sampling settings either as sampling=SamplingParams(...) or as keyword arguments, not both; "
            f"got sampling and {sorted(fields)}"
        )
    from .generation import SamplingParams

    return SamplingParams(**fields)


# names users bring from other libraries, and what llmspeed calls them
def _check_generator_kwargs(kwargs: dict[str, Any]) -> None:
    """``TypeError`` naming each keyword that is neither a Generator argument nor a SamplingParams field."""
    import inspect

    from .generation import Generator, SamplingParams
    from .generation.sampling import unknown_names

    known = set(inspect.signature(Generator.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"unknown keyword arguments {unknown_names(unknown, [*SamplingParams.__dataclass_fields__, *known])}; "
            f"generate_batched takes "
            f"SamplingParams fields {sorted(SamplingParams.__dataclass_fields__)} and Generator arguments {sorted(known)}"
        )


def _linear_positions(hf: nn.Module) -> list[str]:
    """Qualified names of ``hf``'s linear layers as they sit now: ``nn.Linear``s, quantized linears, and wrappers
    of either (LoRA's ``base_layer``, whose own children are not positions), so that a wrapper made after
    ``quantize`` or ``lora.add_adapter`` changed the model finds the layers those verbs put there."""
    names: list[str] = []
    for name, module in hf.named_modules():
        if names and name.startswith(names[-1] + "."):  # inside a position (modules come parent first)
            continue
        if isinstance(base_linear(module), nn.Linear) or is_quantized(module):
            names.append(name)
    return names


_WRAPPER = "_llmspeed_model"  # attribute of a transformers module: the Model a verb wrapped it in


def wrap(hf_model: nn.Module, tokenizer: Any = None) -> Model:
    """Wrap a transformers causal LM (and its tokenizer) as an :class:`llmspeed.Model`.

    A transformers model that a verb already wrapped and changed (``llmspeed.quantize(hf_model, ...)``)
    gets that same wrapper back, which knows where its quantized layers sit; so does a ``Model``. Either way a
    ``tokenizer`` given is checked and set on it (``llmspeed.wrap(llmspeed.models.tiny(vocab_size=len(tokenizer)), tokenizer)``: the vocabularies must agree).
    """
    earlier = hf_model if isinstance(hf_model, Model) else getattr(hf_model, _WRAPPER, None)
    if isinstance(earlier, Model):
        if tokenizer is not None:
            _check_tokenizer(tokenizer, earlier.spec.vocab_size)
            earlier.tokenizer = tokenizer
        return earlier
    return Model(hf_model, tokenizer)


def as_model(model: Any) -> Any:
    """``model`` when it implements :class:`~llmspeed.protocol.CausalLM`; a transformers causal LM wrapped.

    The verbs (``quantize``, ``cast``, ``qat.prepare``/``convert``, ``lora.add_adapter`` and the other ``lora``
    verbs, ``finetune``, ``memory_footprint``) take
    the transformers model users already hold: it is wrapped once (no tokenizer), changed in place, and the
    wrapper is remembered on it, so ``llmspeed.wrap(hf_model, tokenizer)`` afterwards returns the same
    wrapper.

    Raises:
        TypeError: ``model`` is neither (the message says what to pass).
    """
    from .protocol import CausalLM

    if isinstance(model, CausalLM):
        return model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()  # type: ignore[assignment,misc]
    if isinstance(model, PreTrainedModel):
        wrapped = wrap(model)
        object.__setattr__(model, _WRAPPER, wrapped)
        return wrapped
    raise TypeError(
        f"model must be an llmspeed.Model (llmspeed.wrap(hf_model, tokenizer) or llmspeed.models.smollm2()) "
        f"or a transformers causal LM; got {type(model).__module__}.{type(model).__name__}{_wrapper_hint(model)}"
    )
