"""The continuous-batching :class:`Generator`: requests in, one ragged forward per step, tokens out.

``step()`` is short: ask the scheduler for a batch, flatten it, run ``model.forward_batch`` with a
:class:`~.kv_cache.PagedAttention` over the paged cache, sample one token for every sequence whose
chunk reached its end, and finish the sequences that hit a stop condition. The generator only
uses the :class:`~llmspeed.protocol.CausalLM` protocol, so cast, quantized and LoRA models run too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..protocol import CausalLM
from .block_manager import BlockManager
from .kv_cache import PagedAttention, PagedKVCache
from .outputs import GenerationOutput, RequestMetrics, RunStats, StreamEvent
from .sampling import SamplingParams, request_generator, sample
from .scheduler import Batch, Scheduler
from .sequence import Sequence as Seq

Prompt = str | Sequence[int]


class Generator:
    """Continuous batching over a paged KV cache for any :class:`~llmspeed.protocol.CausalLM`.

    Args:
        model: The model (``llmspeed.Model`` or anything implementing the protocol).
        kv_cache_tokens: KV budget in tokens (default 16384 unless ``kv_cache_bytes`` is given).
        kv_cache_bytes: KV budget in bytes instead (converted with ``spec.kv_bytes_per_token``).
        block_size: Tokens per KV block.
        max_batch_tokens: Most tokens (decodes + prefill chunks) in one forward pass.
        max_seqs: Most requests running at once.
        chat_template: Wrap string prompts in the tokenizer's chat template as a user turn.
        progress: Show a tqdm bar (requests done, tokens/s) in ``generate_batched``.
        eos_token_ids: End-of-sequence ids (default: the tokenizer's ``eos_token_id``).
        cuda_graphs: On a CUDA device, replay captured CUDA graphs for decode-only steps.
        fused_decode: On the CPU, run decode-only steps of Llama-family models in one fused C++ call
            (:mod:`.fused_decode`). ``None`` (default) uses it when the model supports it and the kernel
            builds; ``True`` raises ``ValueError`` with the reason when it cannot; ``False`` never uses it.
        attention: How steps attend over the paged cache: ``"sdpa"`` gathers the blocks and runs
            masked SDPA (one call for the decode rows, one for the prefill chunks); ``"triton"`` reads
            the blocks in place with the kernels of :mod:`.triton_attention` (CUDA; ``ValueError`` when
            they cannot run); ``"auto"`` (default) on CUDA, when the kernels pass a check against SDPA,
            runs decode rows through the Triton decode kernel and prefill chunks through SDPA (faster
            than the Triton prefill kernel on an H100: docs/gpu.md), else SDPA.

    Attributes:
        fused_decode_status: ``"on"``, or why decode steps take the generic path.
        attention_status: ``"triton"``, ``"triton decode, sdpa prefill"``, ``"sdpa"``, or
            ``"sdpa (why not triton)"``.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 512,
        max_seqs: int = 64,
        chat_template: bool = False,
        progress: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        cuda_graphs: bool = True,
        fused_decode: bool | None = None,
        attention: str = "auto",
    ):
        spec = model.spec
        if kv_cache_tokens is not None and kv_cache_bytes is not None:
            raise ValueError("give kv_cache_tokens or kv_cache_bytes, not both")
        if kv_cache_bytes is not None:
            if kv_cache_bytes < spec.kv_bytes_per_token * block_size:
                raise ValueError(
                    f"kv_cache_bytes must hold at least one block ({spec.kv_bytes_per_token * block_size} bytes); "
                    f"got {kv_cache_bytes}"
                )
            kv_cache_tokens = kv_cache_bytes // spec.kv_bytes_per_token
        kv_cache_tokens = 16384 if kv_cache_tokens is None else kv_cache_tokens
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}")
        if kv_cache_tokens < block_size:
            raise ValueError(f"kv_cache_tokens must be >= block_size={block_size}; got {kv_cache_tokens}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.chat_template = chat_template
        self.progress = progress
        num_blocks = kv_cache_tokens // block_size
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batch_tokens, max_seqs, spec.max_positions)
        self.device = spec.device
        use_graphs = cuda_graphs and self.device.type == "cuda"
        # one extra block, never allocated, is the scratch space of padded CUDA-graph rows
        self.cache = PagedKVCache(spec, num_blocks + use_graphs, block_size)
        self.attention_status = self._setup_attention(spec, attention)
        self.graphs = None
        if use_graphs:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                model, self.cache, pad_block=num_blocks, max_batch=min(max_seqs, 256), decode_kernel=self.decode_kernel
            )
        self.fused: Any = None  # a FusedDecode when decode steps take the fused CPU path
        self.fused_decode_status = self._setup_fused(model, fused_decode)
        if eos_token_ids is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = frozenset(eos_token_ids)
        self._seqs: dict[int, Seq] = {}
        self._next_id = 0
        self._pending: list[StreamEvent] = []  # ends decided outside step() (errors, aborts)
        self._adapter_names: list[str] | None = None
        self.stats: RunStats | None = None
        self.num_steps = 0
        self.step_paths: dict[str, tuple[int, float]] = {}  # how steps ran: path -> (steps, seconds)

    def _setup_attention(self, spec: Any, wanted: str) -> str:
        self.decode_kernel: Any = None
        self.prefill_kernel: Any = None
        if wanted not in ("auto", "sdpa", "triton"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'triton'; got {wanted!r}")
        if wanted == "sdpa" or (wanted == "auto" and self.device.type != "cuda"):
            return "sdpa"
        from . import triton_attention

        why = triton_attention.probe(self.device, spec.dtype, spec.num_kv_heads, spec.num_heads, spec.head_dim)
        if why is None:
            self.decode_kernel = triton_attention.paged_decode
            if wanted == "auto":  # H100, 256 requests: prefill chunks 0.85 s in SDPA against 1.45 s in Triton
                return "triton decode, sdpa prefill"
            self.prefill_kernel = triton_attention.TRITON_PREFILL
            return "triton"
        if wanted == "triton":
            raise ValueError(f"attention='triton' cannot run here: {why}")
        return f"sdpa ({why})"

    def _setup_fused(self, model: CausalLM, wanted: bool | None) -> str:
        if wanted not in (None, True, False):
            raise ValueError(f"fused_decode must be None, True or False; got {wanted!r}")
        if wanted is False:
            return "off (fused_decode=False)"
        from . import fused_decode

        reason = fused_decode.unsupported(model)
        if reason is None and fused_decode.unavailable() is not None:
            reason = f"the C++ decode kernel is unavailable: {fused_decode.unavailable()}"
        if reason is not None:
            if wanted:
                raise ValueError(f"fused_decode=True, but this model cannot use it: {reason}")
            return f"off ({reason})"
        self.fused = fused_decode.FusedDecode(model, self.cache)
        return "on"

    def warmup(self, context: int = 512) -> int:
        """Capture the CUDA graphs of decode steps for every batch size up to ``max_seqs`` now.

        Without this, each graph is captured the first time a step of its size runs, inside the user's
        run. ``context`` is the longest context (in tokens) the graphs should cover; with the Triton
        decode attention one graph per batch size covers every shorter one. Returns the number of
        graphs held (0 without CUDA graphs, e.g. on the CPU).
        """
        if self.graphs is None:
            return 0
        from .cuda_graphs import bucket

        rows = 1
        while rows <= bucket(self.graphs.max_batch) and self.graphs.capture(rows, context):
            rows *= 2
        return self.graphs.num_graphs

    # --- requests -------------------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            vocab = self.model.spec.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab}); got {ids[:8]}...")
            return ids
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as lists of token ids")
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            return list(ids)
        return list(self.tokenizer.encode(prompt))

    def _check_adapter(self, name: str) -> str | None:
        try:
            from .. import lora
        except ImportError:
            return f"adapter {name!r} requested, but LoRA support (llmspeed.lora) is not available"
        try:
            known = lora.adapter_names(self.model)
        except AttributeError:
            return f"adapter {name!r} requested, but llmspeed.lora has no adapter_names(); update llmspeed"
        if name not in known:
            return f"adapter must be one of the model's adapters {sorted(known)}; got {name!r}"
        return None

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None, *, index: int = 0) -> int:
        """Queue one request; return its id. A request that can never run ends with ``"error"``.

        Raises:
            TypeError: ``sampling`` is not a :class:`SamplingParams`.
        """
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams; got {type(sampling).__name__}")
        rid = self._next_id
        self._next_id += 1
        error = None
        try:
            ids = self._tokenize(prompt)
        except ValueError as exc:
            ids, error = [], str(exc)
        seq = Seq(rid, ids, sampling, index=index, generator=request_generator(sampling, self.device))
        self._seqs[rid] = seq
        if error is None and sampling.adapter is not None:
            error = self._check_adapter(sampling.adapter)
        if error is None:
            error = self.scheduler.add(seq)
        if error is not None:
            seq.error = error
            self._end(seq, "error")
        return rid

    def abort(self, request_id: int) -> None:
        """Stop a request now (finish reason ``"abort"``) and free its KV blocks."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ValueError(f"request_id must be a live request of this generator; got {request_id}")
        if not seq.is_finished:
            self._end(seq, "abort")

    def has_unfinished(self) -> bool:
        """True while some request is queued or running, or some end is not yet reported."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        """Run one forward pass over the scheduled batch; return the events it produced."""
        events, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return events
        start = time.perf_counter()
        path, logits, sampled = self._forward(batch)
        self.scheduler.commit(batch)
        self.num_steps += 1
        tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled]) if sampled else []
        now = time.perf_counter()
        steps, seconds = self.step_paths.get(path, (0, 0.0))
        self.step_paths[path] = (steps + 1, seconds + now - start)
        for seq, token in zip(sampled, tokens):
            seq.output_ids.append(token)
            seq.token_times.append(now)
            reason = self._finish_reason(seq, token)
            if reason is None:
                events.append(StreamEvent(seq.index, seq.seq_id, token))
            else:
                events.append(self._end(seq, reason, token, report=False))
        return events

    def _forward(self, batch: Batch) -> tuple[str, torch.Tensor, list[Seq]]:
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        sampled: list[Seq] = []
        for chunk in batch.chunks:
            ids += chunk.seq.tokens(chunk.start, chunk.start + chunk.length)
            positions += range(chunk.start, chunk.start + chunk.length)
            if chunk.samples:
                rows.append(len(ids) - 1)
                sampled.append(chunk.seq)
        decode_only = len(ids) == len(sampled) == len(batch.chunks)
        if self.graphs is not None and decode_only and not any(s.params.adapter for s in sampled):
            decode = [(c.seq.block_table, c.start, 1, tok) for c, tok in zip(batch.chunks, ids)]
            logits = self.graphs.run(decode)
            if logits is not None:
                return "cuda graph", logits, sampled
        if self.fused is not None and decode_only and not any(s.params.adapter for s in sampled):
            logits = self.fused.run([(c.seq.block_table, c.start, tok) for c, tok in zip(batch.chunks, ids)])
            if logits is not None:
                return "fused cpu", logits, sampled
        chunks = [(c.seq.block_table, c.start, c.length) for c in batch.chunks]
        attention = PagedAttention(self.cache, chunks, self.decode_kernel, self.prefill_kernel)
        dev = self.device
        with torch.inference_mode(), self._adapters(batch):
            logits = self.model.forward_batch(
                torch.tensor(ids, dtype=torch.long, device=dev),  # [T]
                torch.tensor(positions, dtype=torch.long, device=dev),  # [T]
                attention,
                torch.tensor(rows, dtype=torch.long, device=dev),  # [N]
            )  # [N, V]
        return ("decode" if decode_only else "mixed"), logits, sampled

    def _adapters(self, batch: Batch):
        if all(c.seq.params.adapter is None for c in batch.chunks):
            return nullcontext()
        from ..lora import active_adapter, per_token_adapters

        default = active_adapter(self.model)  # requests without an adapter run the model as it is set
        names: list[str | None] = []
        for chunk in batch.chunks:
            names += [chunk.seq.params.adapter or default] * chunk.length
        return per_token_adapters(self.model, names)

    def _finish_reason(self, seq: Seq, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                seq.text_end = min(hits)
                return "stop"
        if len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.scheduler.max_tokens_per_seq:
            return "length"
        return None

    def _end(self, seq: Seq, reason: str, token: int | None = None, report: bool = True) -> StreamEvent:
        self.scheduler.finish(seq, reason)
        seq.finish_time = time.perf_counter()
        event = StreamEvent(seq.index, seq.seq_id, token, finished=True, output=self._output(seq))
        if report:
            self._pending.append(event)
        return event

    def _output(self, seq: Seq) -> GenerationOutput:
        times = seq.token_times
        text = ""
        if self.tokenizer is not None and seq.output_ids:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if seq.text_end is not None:
                text = self.tokenizer.decode(seq.output_ids)[: seq.text_end]
        metrics = RequestMetrics(
            prompt_tokens=len(seq.prompt_ids),
            output_tokens=len(seq.output_ids),
            time_to_first_token=times[0] - seq.arrival_time if times else None,
            inter_token_latency=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            latency=(seq.finish_time - seq.arrival_time) if seq.finish_time is not None else None,
            num_preemptions=seq.num_preemptions,
        )
        return GenerationOutput(
            index=seq.index,
            request_id=seq.seq_id,
            prompt_token_ids=list(seq.prompt_ids),
            token_ids=list(seq.output_ids),
            text=text,
            finish_reason=seq.finish_reason or "error",
            error=seq.error,
            metrics=metrics,
        )

    # --- whole runs -----------------------------------------------------------------------------
    def _add_all(self, prompts: Sequence[Prompt], sampling: Any) -> list[int]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts; got a single string (wrap it in a list)")
        if sampling is None or isinstance(sampling, SamplingParams):
            params = [sampling] * len(prompts)
        else:
            params = list(sampling)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling must be one SamplingParams or one per prompt ({len(prompts)}); got {len(params)}"
                )
        return [self.add_request(p, s, index=i) for i, (p, s) in enumerate(zip(prompts, params))]

    def _events(self, prompts: Sequence[Prompt], sampling: Any) -> Iterator[StreamEvent]:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        steps0, preempt0, paths0 = self.num_steps, self.scheduler.num_preemptions, dict(self.step_paths)
        rids = self._add_all(prompts, sampling)
        seqs = [self._seqs[r] for r in rids]
        done, out_tokens = 0, 0
        bar = tqdm(total=len(rids), unit="req", disable=not self.progress, desc="generate", leave=False)
        try:
            while self.has_unfinished():
                for event in self.step():
                    out_tokens += event.token_id is not None
                    if event.finished:
                        done += 1
                        bar.update(1)
                    yield event
                bar.set_postfix(tok_s=f"{out_tokens / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
        finally:
            bar.close()
            self.stats = RunStats(
                requests=len(rids),
                prompt_tokens=sum(len(s.prompt_ids) for s in seqs),
                output_tokens=sum(len(s.output_ids) for s in seqs),
                elapsed=time.perf_counter() - start,
                steps=self.num_steps - steps0,
                preemptions=self.scheduler.num_preemptions - preempt0,
                step_paths=_paths_since(self.step_paths, paths0),
            )

    def generate_batched(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[GenerationOutput]:
        """Run every prompt to completion with continuous batching; results in prompt order."""
        if len(prompts) == 0:
            return []
        outputs: list[GenerationOutput | None] = [None] * len(prompts)
        for event in self._events(prompts, sampling):
            if event.finished:
                outputs[event.index] = event.output
                self._seqs.pop(event.request_id, None)
        return outputs  # type: ignore[return-value]

    def stream(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[StreamEvent]:
        """Yield a :class:`StreamEvent` per generated token (with its text) as steps produce them."""
        if len(prompts) == 0:
            return
        sent: dict[int, str] = {}
        for event in self._events(prompts, sampling):
            seq = self._seqs[event.request_id]
            text = ""
            if self.tokenizer is not None and event.token_id is not None:
                full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
                if event.finished and event.output is not None:
                    full = event.output.text
                prev = sent.get(event.request_id, "")
                if not full.endswith("\ufffd"):  # wait for complete UTF-8 characters
                    text = full[len(prev) :] if full.startswith(prev) else ""
                    sent[event.request_id] = full
            if event.finished:
                self._seqs.pop(event.request_id, None)
            yield StreamEvent(event.index, event.request_id, event.token_id, text, event.finished, event.output)


def _paths_since(now: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    """Steps and seconds per path added between two snapshots of ``Generator.step_paths``."""
    added = {}
    for path, (steps, seconds) in now.items():
        steps0, seconds0 = before.get(path, (0, 0.0))
        if steps > steps0:
            added[path] = (steps - steps0, seconds - seconds0)
    return added


__all__ = ["Generator"]
