"""The continuous-batching :class:`Generator`: requests in, one ragged forward per step, tokens out.

``step()`` is short: ask the scheduler for a batch, hand it to the :class:`~.runner.ModelRunner` as
one :class:`~.runner.StepInput`, sample one token for every sequence whose chunk reached its end,
and turn tokens into events (text deltas, stop conditions) through each request's
:class:`~.detokenizer.Detokenizer`. The generic step path uses only the :class:`~llmspeed.protocol.CausalLM`
protocol (CUDA graphs capture ``forward_batch`` too), so cast, quantized and LoRA models run; one fast
path reaches past it: the fused CPU decode step (:mod:`.fused_decode`) walks ``model.hf.model.layers`` of
Llama-family ``llmspeed.Model``s, checks what it needs, and otherwise leaves decode steps to the generic path.

It is single-threaded by design: one thread steps it. Entering it from a second thread while a
step runs raises ``RuntimeError`` (use :class:`llmspeed.Engine` to share a model between threads).
A step that raises fails only the requests in its batch (finish reason ``"error"``), and the
generator stays usable.

Four jobs live beside it: :mod:`.admission` (a new request's sequence, and why it cannot run),
:mod:`.request_events` (a token's event, a request's end, a failed batch), :mod:`.runs` (``generate_batched`` /
``stream`` read only their own requests' events) and :mod:`.greedy_burst` (multi-step decode after a decode step).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..protocol import CausalLM, step_lock
from .admission import admit, check_priority
from .block_manager import BlockManager
from .context_limits import context_limit
from .generator_args import check_arguments
from .greedy_burst import BURST_PATHS, greedy_burst
from .kv_cache import weights_key
from .outputs import GenerationOutput, RunStats, StreamEvent
from .prompt_logprobs import take as take_prompt_logprobs
from .prompt_logprobs import with_prompt_rows
from .prompts import Prompt, eos_ids, hint_chat_template, prompt_list
from .request_adapters import follow
from .request_events import STEP_FAILED as STEP_FAILED  # imported from here by llmspeed.serving.server
from .request_events import append_tokens, end_request, fail_batch, record_path, sampling_rows, token_event
from .runner import ModelRunner, StepInput
from .runs import run_events
from .sampler import sample_batch
from .sampling import SamplingParams, coerce, is_int, sampling_list
from .scheduler import Batch, Scheduler
from .sequence import Sequence as Seq
from .structured import Grammars

if TYPE_CHECKING:
    import torch


class Generator:
    """Continuous batching over a paged KV cache for any :class:`~llmspeed.protocol.CausalLM`.

    Args:
        model: The model (``llmspeed.Model`` or anything implementing the protocol).
        kv_cache_tokens: KV budget in tokens (default 16384 unless ``kv_cache_bytes`` is given).
        kv_cache_bytes: KV budget in bytes instead (converted at ``kv_cache_dtype``'s bytes per token).
        kv_cache_dtype: Dtype of the cached keys and values: ``"auto"`` (default: the model's, followed when
            :func:`llmspeed.cast` changes it: the cache is converted before the next step), or on the CPU
            ``"bf16"`` / ``"fp16"`` (any spelling :func:`llmspeed.cast` takes) for a cache of half an fp32
            model's bytes, which the decode attention reads in about two thirds of the time (llama.cpp's
            cache is fp16 by default); ``"fp32"``. Keys and values are rounded to it
            once, when written (docs/batching.md); a step whose keys or values pass fp16's range (65504) is
            refused with a ``ValueError``, which ends its requests with an error.
        block_size: Tokens per KV block.
        max_batch_tokens: Most tokens (decodes + prefill chunks) in one forward pass.
        max_seqs: Most requests running at once.
        chat_template: Wrap string prompts in the tokenizer's chat template as a user turn. A prompt
            given as a list of chat messages (``[{"role": ..., "content": ...}]``) always uses it.
        progress: Show a tqdm bar (requests done, tokens/s) in ``generate_batched``.
        eos_token_ids: End-of-sequence ids (default: the tokenizer's ``eos_token_id`` and every id of
            the model's ``generation_config.eos_token_id``).
        prefix_caching: Share the KV blocks of common prompt prefixes between requests
            (:mod:`.block_manager`).
        cuda_graphs: On a CUDA device, replay captured CUDA graphs for decode-only steps.
        fused_decode: On the CPU, run decode-only steps of Llama-family models in one fused C++ call
            (:mod:`.fused_decode`). ``None`` (default) uses it when the model supports it and the kernel
            builds; ``True`` raises ``ValueError`` with the reason when it cannot; ``False`` never uses it.
        lora_dtype: Precision of the LoRA adapter stacks the fused CPU decode step reads: ``"fp16"``
            (default, as llama.cpp's adapter files: half the bytes a step with adapters reads, each weight
            within fp16's rounding) or ``"fp32"`` (the adapters' weights exactly); any spelling
            :func:`llmspeed.cast` takes (``"float16"``, ``torch.float32``, ...). The generic path
            always applies adapters in the model's precision.
        attention: How steps attend over the paged cache: ``"sdpa"`` gathers the blocks and runs
            masked SDPA (one call for the decode rows, one for the prefill chunks); ``"triton"`` reads
            the blocks in place with the kernels of :mod:`.triton_attention` (CUDA; ``ValueError`` when
            they cannot run); ``"auto"`` (default) on CUDA, when the kernels pass a check against SDPA,
            runs decode rows through the Triton decode kernel and prefill chunks through SDPA (faster
            than the Triton prefill kernel on an H100: docs/gpu.md), and a step's new prompts, when every
            chunk starts its sequence, through FlashAttention's varlen kernel (fp16/bf16), else SDPA.
        num_scheduler_steps: Most decode steps one :meth:`step` runs (vLLM's multi-step scheduling). With
            more than 1 (say 8), a decode step whose requests all want no logprobs, penalties or pending
            ``min_tokens``, with no request waiting, goes on for up to that many steps back to back
            (:meth:`.runner.ModelRunner.burst_steps`: greedy requests in one C++ call on the fused CPU path;
            elsewhere, CUDA graphs included, greedy or random sampling on the device), without the scheduling
            and detokenizing between them; the tokens are the same, and arrive as one step's events. It saves
            the Python (and on a GPU the waits) between steps (docs/kernels.md); tokens stream in bursts.
        scheduling_policy: ``"fcfs"`` (default: first come, first served) or ``"priority"`` (vLLM's: requests run
            in order of the ``priority`` given to :meth:`add_request`, lower first, and a request is preempted for
            one of a lower value: :mod:`.scheduler`).
        max_model_len: Most tokens (prompt and output) one request may hold, below what the model allows (vLLM's
            ``max_model_len``); ``None`` (default): the model's own limit (:mod:`.context_limits`).

    Attributes:
        fused_decode_status: ``"on"``, or why decode steps take the generic path (read when asked: a model
            changed after the generator was built, e.g. an adapter added to the output head, says so).
        attention_status: The per-layer path's kernels (``"triton"``, ``"triton decode, sdpa prefill"``,
            ``"C++ paged decode, sdpa prefill"``, ``"sdpa"``, or ``"sdpa (why not triton)"``), followed by
            what the fused CPU step attends with (decode rows; prompt chunks too where ``mixed``) when it runs.
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
        prefix_caching: bool = False,
        cuda_graphs: bool = True,
        fused_decode: bool | None = None,
        lora_dtype: str | torch.dtype = "fp16",
        attention: str = "auto",
        kv_cache_dtype: str | torch.dtype = "auto",
        num_scheduler_steps: int = 1,
        scheduling_policy: str = "fcfs",
        max_model_len: int | None = None,
    ):
        kv_cache_tokens, eos = check_arguments(
            model, kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=kv_cache_bytes, block_size=block_size,
            max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, eos_token_ids=eos_token_ids,
            kv_cache_dtype=kv_cache_dtype, num_scheduler_steps=num_scheduler_steps,
            flags={"prefix_caching": prefix_caching, "chat_template": chat_template, "progress": progress,
                   "cuda_graphs": cuda_graphs},
        )  # fmt: skip
        spec = model.spec
        self.num_scheduler_steps = num_scheduler_steps
        self.model = model
        self.tokenizer = model.tokenizer
        self.chat_template = chat_template
        self.progress = progress
        num_blocks = kv_cache_tokens // block_size
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        context, note = context_limit(model, spec.max_positions, max_model_len)
        self.scheduler = Scheduler(self.blocks, max_batch_tokens, max_seqs, context, scheduling_policy)
        self.scheduler.context_note = note
        self.scheduler.weights_key = self._weights_key
        self._weights: int | None = None  # _weights_key's last answer
        self.device = spec.device
        self.runner = ModelRunner(model, num_blocks, block_size, max_seqs, cuda_graphs=cuda_graphs,
                                  fused_decode=fused_decode, lora_dtype=lora_dtype, attention=attention,
                                  kv_cache_dtype=kv_cache_dtype)
        self.eos_token_ids = frozenset(eos_ids(model) if eos is None else eos)
        self.grammars = Grammars(self.tokenizer, spec.vocab_size, self.eos_token_ids)  # structured outputs'
        self._seqs: dict[int, Seq] = {}  # live requests; released after their final event
        self._next_id = 0
        self._pending: deque[StreamEvent] = deque()  # events not yet handed out (ends outside step(), other runs')
        self._run_rids: set[int] = set()  # requests of the generate_batched / stream runs still being read
        self._run_stepping = False  # True while such a run steps (it takes every event; step() keeps theirs)
        self._lock = threading.Lock()
        self._adapter_changes: int | None = None  # lora's STATE_CHANGES when the live requests' adapters were checked
        self.stats: RunStats | None = None
        self.num_steps = 0
        self.num_tokens_computed = 0  # tokens run through the model (prefill chunks and decodes)
        self.step_paths: dict[str, tuple[int, float]] = {}  # how steps ran: path -> (steps, seconds)

    # --- what the runner owns -------------------------------------------------------------------
    @property
    def cache(self) -> Any:
        """The paged KV cache tensors."""
        return self.runner.cache

    @property
    def graphs(self) -> Any:
        """The CUDA decode graphs (``None`` off CUDA)."""
        return self.runner.graphs

    @property
    def fused(self) -> Any:
        """The fused CPU decode step (``None`` when decode steps take the generic path)."""
        return self.runner.fused

    @property
    def fused_decode_status(self) -> str:
        """``"on"``, or why decode steps take the generic path."""
        return self.runner.fused_decode_status

    @property
    def attention_status(self) -> str:
        """Which attention kernels steps use."""
        return self.runner.attention_status

    @property
    def weight_pages_status(self) -> str:
        """On the CPU, ``"2 MiB pages: N MB of weights"`` (with what this generator moved and how long it took:
        :mod:`llmspeed.huge_pages`) or ``"4 KiB pages (why)"``; elsewhere the device's memory."""
        return self.runner.weight_pages

    def warmup(self, context: int = 512) -> int:
        """Capture the CUDA graphs of decode steps for every batch size up to ``max_seqs`` now.

        Without this, each graph is captured the first time a step of its size runs, inside the user's
        run. ``context`` is the longest context (in tokens) the graphs should cover; with the Triton
        decode attention one graph per batch size covers every shorter one. Returns the number of
        graphs held (0 without CUDA graphs, e.g. on the CPU).
        """
        return self.runner.warmup(self.scheduler.max_seqs, context)

    @contextmanager
    def _exclusive(self, what: str):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"Generator.{what}() was called from thread {threading.current_thread().name!r} while another "
                f"thread is inside this Generator; a Generator is single-threaded: use llmspeed.Engine to share "
                f"one model between threads"
            )
        try:
            yield
        finally:
            self._lock.release()

    # --- requests -------------------------------------------------------------------------------
    def _weights_key(self) -> int:
        """:func:`.kv_cache.weights_key` of the model, which the scheduler keys prefix-cache blocks by; a change also
        drops the blocks nobody holds (:meth:`.BlockManager.reset_prefix_cache`)."""
        key = weights_key(self.model.module)
        if self._weights is not None and key != self._weights:
            self.blocks.reset_prefix_cache()
        self._weights = key
        return key

    def weights_changed(self) -> None:
        """Say that the model's weights changed in a way the generator cannot see: writes through ``tensor.data``
        (``w.data.copy_(new)``), which change neither a tensor's storage nor its version. Drops what was computed from
        the old values (the prefix cache's unused blocks, the fused CPU step's fp32 copies, LoRA stacks and rotary
        tables); the next step reads the model again, while running requests keep their keys and values. Every other
        change (in place under ``torch.no_grad()``, ``load_state_dict``, ``cast``, ``quantize``, the ``lora`` verbs,
        training) is seen without it. Callable from any thread: it waits for a step in flight (the model's step lock)."""
        with step_lock(self.model.module):
            self.blocks.reset_prefix_cache()
            if self.runner.fused is not None:
                self.runner.fused.forget()

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None, *, index: int = 0,
                    priority: int = 0) -> int:  # fmt: skip
        """Queue one request; return its id. A request that can never run ends with ``"error"``, as does one
        that gives stop strings to a model without a tokenizer (there is no text to find them in).

        ``prompt`` is a string, a list of token ids, or a list of chat messages. ``index`` is copied to the
        request's outputs (:meth:`generate_batched` numbers its prompts with it). ``priority``: with
        ``scheduling_policy="priority"``, lower runs first (vLLM's); else it must be 0.

        Raises:
            TypeError: ``sampling`` is neither a :class:`SamplingParams` nor a dict of its fields.
            ValueError: ``index`` is not a non-negative integer, or ``priority`` not an integer (not 0 under "fcfs").
            RuntimeError: Another thread is inside this generator.
        """
        sampling = coerce(sampling)
        if not is_int(index) or index < 0:
            raise ValueError(f"index must be a non-negative integer; got {index!r}")
        check_priority(priority, self.scheduler.policy)
        # the model's step lock: another thread's lora verb cannot change the adapters between the checks below
        with self._exclusive("add_request"), step_lock(self.model.module):
            rid = self._next_id
            self._next_id += 1
            admit(self, rid, prompt, sampling, index, priority)
            return rid

    def abort(self, request_id: int) -> None:
        """Stop a request now (finish reason ``"abort"``) and free its KV blocks.

        Aborting a request that already ended does nothing.

        Raises:
            ValueError: ``request_id`` was never returned by this generator.
        """
        if not is_int(request_id) or not 0 <= request_id < self._next_id:  # True is an int to Python, never an id
            raise ValueError(f"request_id must be an id returned by add_request (0 to {self._next_id - 1}); got {request_id!r}")
        with self._exclusive("abort"):
            seq = self._seqs.get(request_id)
            if seq is not None and not seq.is_finished:
                self._end(seq, "abort")

    def has_unfinished(self) -> bool:
        """True while some request is queued or running, or some event is not yet handed out (events kept for a
        ``generate_batched`` / ``stream`` run still being read count for that run only)."""
        return self.scheduler.has_unfinished() or any(e.request_id not in self._run_rids for e in self._pending)

    @property
    def num_live(self) -> int:
        """Requests whose final event has not been produced yet."""
        return len(self._seqs)

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        """Run one forward pass over the scheduled batch; return the events it produced.

        Events decided between steps (errors at admission, aborts) come first. If the step raises, the
        requests of its batch end with ``"error"`` (their events are returned, or kept for the next
        call when the exception is a ``KeyboardInterrupt`` or similar, which is re-raised). Events of the
        requests of a ``generate_batched`` / ``stream`` run still being read are kept for that run.
        """
        events = self._step()
        if self._run_stepping or not self._run_rids:
            return events
        self._pending.extend(e for e in events if e.request_id in self._run_rids)  # the run's, in order
        return [e for e in events if e.request_id not in self._run_rids]

    def _step(self) -> list[StreamEvent]:
        # the model's step lock from the adapter check to the last token: lora verbs called from other threads
        # (they take it too) run between steps, never between the check and the forward or inside it
        with self._exclusive("step"), step_lock(self.model.module):
            self._follow_adapter_changes()  # before taking events: if it raises, they stay queued, never lost
            events = self._take_pending()
            batch = self.scheduler.schedule()
            if not batch.chunks:
                return events
            try:  # events go straight into ``events``: those of requests that ended before a raise must survive it
                path = self._run(batch, events)
                if self.num_scheduler_steps > 1 and path in BURST_PATHS:
                    greedy_burst(self, batch, events, path)
            except Exception as exc:
                events += self._fail(batch, exc)
            except BaseException as exc:
                self._pending.extendleft(reversed(events + self._fail(batch, exc)))
                raise
            return events

    def _take_pending(self) -> list[StreamEvent]:
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    def _follow_adapter_changes(self) -> None:
        """Bring the live requests in line with the model's adapters as they are now (:func:`.request_adapters.follow`):
        those that can no longer run end with an error."""
        self._adapter_changes, ended = follow(self.model, self._adapter_changes, self._seqs.values())
        for seq, error in ended:
            seq.error = error
            self._end(seq, "error")

    def _fail(self, batch: Batch, exc: BaseException) -> list[StreamEvent]:
        return fail_batch(self, batch, exc)

    def _run(self, batch: Batch, events: list[StreamEvent]) -> str:
        """Run ``batch`` through the model and sample; append its events to ``events``; return the step's path."""
        start = time.perf_counter()
        step = StepInput.build(
            [(c.seq.block_table, c.start, c.length, c.seq.tokens(c.start, c.start + c.length), c.samples,
              c.seq.params.adapter) for c in batch.chunks],
            self.blocks.block_size,
        )
        step, extra = with_prompt_rows(step, batch)  # and the rows whose logits give prompt_logprobs
        path, logits = self.runner.run(step)
        logits = take_prompt_logprobs(extra, logits)  # [sampled, V]
        self.scheduler.commit(batch)
        self.num_steps += 1
        self.num_tokens_computed += len(step.ids)
        sampled = [c.seq for c in batch.chunks if c.samples]
        try:  # counted in num_steps above: recorded in step_paths even when sampling raises
            sampled, logits, rows = sampling_rows(self, sampled, logits, events)
            tokens, logprobs = sample_batch(logits, [s.params for s in sampled], [s.generator for s in sampled],
                                            rows) if sampled else ([], [])
        finally:
            now = self._record(path, start)
        append_tokens(self, sampled, tokens, logprobs, now, events)
        return path

    def _token_event(self, seq: Seq, token: int, lp: Any, events: list[StreamEvent]) -> StreamEvent:
        return token_event(self, seq, token, lp, events)

    def _record(self, path: str, start: float, count: int = 1, end: float | None = None) -> float:
        return record_path(self.step_paths, path, start, count, end)

    def _end(self, seq: Seq, reason: str, token: int | None = None, text: str = "", report: bool = True,
             logprobs: Any = None) -> StreamEvent:
        return end_request(self, seq, reason, token, text, report, logprobs)

    # --- whole runs -----------------------------------------------------------------------------
    def generate_batched(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """Run every prompt to completion with continuous batching; results in prompt order.

        Only these prompts' outputs are returned; other requests of the generator are left as they are.
        ``prompts`` may be any iterable of prompts (a generator is read once). ``priority``: one per prompt, as
        :meth:`add_request` takes it (vLLM's ``LLM.generate(priority=...)``).
        """
        events = self.stream(prompts, sampling, priority)
        outputs = {e.request_id: e.output for e in events if e.finished and e.output is not None}
        return [o for _, o in sorted(outputs.items())]  # stream warned, once its run ended, as the docstring says

    def stream(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield a :class:`StreamEvent` per generated token (with its new text) as steps produce them.

        Closing the iterator early (``break``, an exception in the loop) aborts the prompts still running. A run
        that ends warns when a plain-text prompt to a chat model wrote nothing (:func:`.prompts.hint_chat_template`).
        """
        prompts = prompt_list(prompts)
        if len(prompts) == 0:
            sampling_list(sampling, 0)  # checked all the same: a bad value is refused, not ignored
            return
        finals = []
        for event in run_events(self, prompts, sampling, priority):
            if event.finished and event.output is not None:
                finals.append(event.output)
            yield event
        if not self.chat_template:
            hint_chat_template(self.tokenizer, prompts, sorted(finals, key=lambda o: o.index), self.eos_token_ids)


__all__ = ["Generator"]

