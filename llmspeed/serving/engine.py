"""The serving engine: one background thread steps a :class:`~llmspeed.generation.Generator` for many callers.

Callers never touch the generator. :meth:`Engine.submit` (any thread) and :meth:`Engine.generate` /
:meth:`Engine.stream` (asyncio) put commands in an inbox and return at once; the engine thread takes
the inbox at the top of every iteration (new requests, aborts), runs one step, and hands each event
to the handle of the request it belongs to. With nothing to do it sleeps until a command arrives.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from ..generation import GenerationOutput, Generator, RequestMetrics, SamplingParams, StreamEvent
from ..generation.admission import check_priority
from ..generation.sampling import coerce
from ..protocol import CausalLM
from .handle import RequestHandle
from .request_stats import RequestStats

Prompt = str | Sequence[int] | Sequence[dict]
Command = tuple[str, RequestHandle, Any, Any, int]  # (kind, handle, prompt, sampling, priority): the inbox's entries
MAX_FAILING_TURNS = 8  # a step raising this many turns in a row (before touching a request) ends the requests held
ENGINE_DIED = "the engine thread died"  # how the error of a request ended by the engine thread's death begins


class Engine:
    """A long-lived, thread-safe, asyncio-friendly continuous-batching engine over one model.

    Args:
        model: The model (``llmspeed.Model`` or anything implementing the protocol).
        kv_cache_tokens: KV budget in tokens.
        max_batch_tokens: Most tokens in one forward pass. Each running request takes at least one, so below
            ``max_seqs`` it also caps the requests running at once (the others wait in the queue).
        prefix_caching: Share the KV blocks of common prompt prefixes (system prompts) between requests.
        **generator_kwargs: The other :class:`~llmspeed.generation.Generator` arguments (``max_seqs``,
            ``block_size``, ``chat_template``, ``eos_token_ids``, ...).

    Use it as a context manager, or call :meth:`close`; requests still running then end with ``"abort"``. An
    engine dropped without either (and without live handles, which each hold it) is closed when collected.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        kv_cache_tokens: int | None = None,
        max_batch_tokens: int = 512,
        prefix_caching: bool = True,
        **generator_kwargs: Any,
    ):
        generator_kwargs.setdefault("progress", False)
        self.generator = Generator(
            model, kv_cache_tokens=kv_cache_tokens, max_batch_tokens=max_batch_tokens,
            prefix_caching=prefix_caching, **generator_kwargs,
        )
        self.model = model
        self._cv = threading.Condition()
        self._inbox: list[Command] = []
        self._handles: dict[int, RequestHandle] = {}
        self._closing = False
        self._death: str | None = None  # why the engine thread died, if it did (then the engine is closed)
        self._applying: list[Command] = []  # commands taken from the inbox, being applied
        self.tokens_generated = 0
        self.requests_finished = 0
        self.stats = RequestStats()  # what /metrics reports of the requests that ended (histograms, prompt tokens)
        self.loop_errors = 0  # exceptions outside a step (a bug if ever non-zero); the loop survives them
        self._failing = 0  # turns in a row whose step raised: the requests held are ended at MAX_FAILING_TURNS
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._cv), name="llmspeed-engine",
                                        daemon=True)
        self._thread.start()

    # --- submitting -----------------------------------------------------------------------------
    def submit(self, prompt: Prompt, sampling: SamplingParams | None = None, priority: int = 0) -> RequestHandle:
        """Queue a request from any thread; return its :class:`RequestHandle` at once.

        A prompt is a string, a list of token ids or a list of chat messages. A request that cannot run
        (bad token ids, too long, unknown adapter) ends with finish reason ``"error"`` and its message.
        ``priority``: lower runs first on an engine built with ``scheduling_policy="priority"`` (vLLM's); else 0.

        Raises:
            TypeError: ``sampling`` is neither a :class:`~llmspeed.generation.SamplingParams` nor a dict of its fields.
            ValueError: ``priority`` is not an integer, or not 0 under the default ``"fcfs"`` policy.
            RuntimeError: The engine is closed.
        """
        sampling = coerce(sampling)
        self.prepare(sampling)
        return self._submit(prompt, sampling, None, priority)

    def prepare(self, sampling: SamplingParams) -> None:
        """Do in the calling thread what admitting a request with ``sampling`` would otherwise do in the step loop,
        where every running request waits for it: compile its structured-output grammar (5-9 ms, and the first one
        walks the vocabulary). :meth:`submit` calls it; the asyncio methods run it in a worker thread."""
        if sampling.structured_outputs is not None:
            self.generator.grammars.prepare(sampling.structured_outputs)

    def _submit(self, prompt: Prompt, sampling: Any, loop: asyncio.AbstractEventLoop | None,
                priority: int = 0) -> RequestHandle:  # fmt: skip
        return self._submit_all([(prompt, sampling)], loop, priority)[0]

    def _submit_all(self, requests: Sequence[tuple[Prompt, Any]], loop: asyncio.AbstractEventLoop | None,
                    priority: int = 0) -> list[RequestHandle]:  # fmt: skip
        """Queue ``requests`` (prompt, sampling) together, each with ``priority``: the engine thread admits them in one
        turn, before its next step, so one refused at admission (too long, bad ids) has ended before any of the others
        has a token. All or none: a closed engine raises ``RuntimeError``, a bad ``priority`` ``ValueError``, before
        any is queued."""
        check_priority(priority, self.generator.scheduler.policy)
        commands: list[Command] = [("add", RequestHandle(self._request_abort, loop), _snapshot(prompt), coerce(sampling),
                                    priority) for prompt, sampling in requests]  # fmt: skip
        with self._cv:
            if self._closing:
                raise RuntimeError(self._death or "the engine is closed")
            self._inbox.extend(commands)
            self._cv.notify()
        return [command[1] for command in commands]

    def _request_abort(self, handle: RequestHandle) -> None:
        with self._cv:
            if self._closing:  # close() aborts every request still running: nothing left to ask
                return
            self._command("abort", handle, None, None)

    def _command(self, kind: str, handle: RequestHandle, prompt: Any, sampling: Any) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError(self._death or "the engine is closed")
            self._inbox.append((kind, handle, prompt, sampling, 0))
            self._cv.notify()

    async def generate(self, prompt: Prompt, sampling: SamplingParams | None = None,
                       priority: int = 0) -> GenerationOutput:  # fmt: skip
        """Run one request to completion from asyncio; cancelling the awaiting task aborts it."""
        sampling = coerce(sampling)
        if sampling.structured_outputs is not None:
            await asyncio.to_thread(self.prepare, sampling)
        handle = self._submit(prompt, sampling, asyncio.get_running_loop(), priority)
        try:
            async for _ in handle.events():
                pass
        finally:
            if not handle.done():
                handle.abort()
        return handle.result(timeout=0)

    async def stream(self, prompt: Prompt, sampling: SamplingParams | None = None,
                     priority: int = 0) -> AsyncIterator[StreamEvent]:  # fmt: skip
        """Yield the request's events from asyncio; leaving the loop early (or a disconnect) aborts it."""
        sampling = coerce(sampling)
        if sampling.structured_outputs is not None:
            await asyncio.to_thread(self.prepare, sampling)
        handle = self._submit(prompt, sampling, asyncio.get_running_loop(), priority)
        try:
            async for event in handle.events():
                yield event
        finally:
            if not handle.done():
                handle.abort()

    # --- the engine thread ----------------------------------------------------------------------
    def _apply(self, commands: list[Command]) -> None:
        gen = self.generator
        for kind, handle, prompt, sampling, priority in commands:
            try:
                if kind == "add":
                    rid = gen.add_request(prompt, sampling, priority=priority)
                    handle.request_id = rid
                    self._handles[rid] = handle
                elif handle.request_id is not None and not handle.done():
                    gen.abort(handle.request_id)
            except Exception as exc:  # one command's fault: it fails its own request, never the rest of the inbox
                self.loop_errors += 1
                if kind == "add" and handle.request_id is None:
                    refused = _refused(exc)
                    self._count_end(refused)  # it ended (refused): /metrics counts it, as it counts one ended by step
                    handle._deliver(refused)

    def _dispatch(self, events: list[StreamEvent]) -> None:
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue
            self.tokens_generated += event.token_id is not None
            if event.finished:
                del self._handles[event.request_id]
                self._count_end(event)
            handle._deliver(event)

    def _count_end(self, event: StreamEvent) -> None:
        """Count a request's final event for ``/metrics``: one more finished, and its output's statistics."""
        self.requests_finished += 1
        if event.output is not None:
            self.stats.observe(event.output)

    def _has_work(self) -> bool:
        return bool(self._inbox) or self._closing or self.generator.has_unfinished()

    def _run_once(self) -> bool:
        """One turn of the engine thread: take the inbox, run one step; False once closed and drained."""
        gen = self.generator
        with self._cv:
            commands, self._inbox = self._inbox, []
            closing = self._closing
        self._applying = commands  # until applied: a death in between must still end them (_died)
        try:
            self._apply(commands)
            self._applying = []
            if closing:
                for handle in list(self._handles.values()):
                    if not handle.done() and handle.request_id is not None:
                        gen.abort(handle.request_id)
                while gen.has_unfinished() and self._handles:
                    self._dispatch(gen.step())
                return False
            self._dispatch(gen.step())
            self._failing = 0
        except Exception as exc:  # never lose the thread: the generator already failed what its step touched
            self.loop_errors += 1
            self._failing += 1
            if self._failing >= MAX_FAILING_TURNS:  # raising before any request is touched: end them, not spin
                self._fail_held(f"the engine's step raised {self._failing} times in a row: {type(exc).__name__}: {exc}")
            time.sleep(min(0.001 * 2**self._failing, 0.5))  # back off rather than spin a core on a repeating fault
        return True

    def _fail_held(self, message: str) -> None:
        """End every request this engine holds with ``message`` (finish reason ``"error"``)."""
        self._failing = 0
        handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            if handle.request_id is None:  # never added: nothing to abort (abort(None) raised, and was passed over)
                continue
            try:
                self.generator.abort(handle.request_id)
            except Exception:
                pass
        self._end_handles(handles, message)

    def _end_handles(self, handles: list[RequestHandle], message: str) -> None:
        """Give each of ``handles`` not yet done a final ``"error"`` event with ``message``, counted as finished."""
        for handle in handles:
            if not handle.done():
                ended = _ended(message, handle.request_id)
                self._count_end(ended)
                try:
                    handle._deliver(ended)
                except Exception:
                    pass

    # --- state ----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """A snapshot of the engine's state (what ``/metrics`` serves): requests, KV blocks, prefix cache."""
        gen = self.generator
        blocks = gen.blocks
        return {
            "requests_running": len(gen.scheduler.running),
            "requests_waiting": len(gen.scheduler.waiting),
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_free": blocks.num_free,
            "kv_blocks_used": blocks.num_blocks - blocks.num_free,
            "prefix_cache_hit_rate": blocks.hit_rate,
            "prefix_cache_blocks": blocks.num_cached,
            "tokens_generated": self.tokens_generated,
            "requests_finished": self.requests_finished,
        }

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called, or the engine thread died (:attr:`error`)."""
        return self._closing

    @property
    def error(self) -> str | None:
        """Why the engine thread died (an exception it could not survive, such as a ``KeyboardInterrupt`` raised
        in it), or ``None``. A dead engine is closed: its requests ended with ``"error"``, and :meth:`submit` raises."""
        return self._death

    def _died(self, exc: BaseException) -> None:
        """The engine thread is dying of ``exc``: close the engine and end every request it held, so no caller waits
        forever on a thread that is gone."""
        with self._cv:
            self._death = f"{ENGINE_DIED}: {type(exc).__name__}: {exc}"
            self._closing = True
            commands, self._inbox = self._applying + self._inbox, []
        handles = {id(h): h for h in [*self._handles.values(), *(c[1] for c in commands if c[0] == "add")]}
        self._handles.clear()
        self._end_handles(list(handles.values()), self._death)

    def close(self, timeout: float | None = 30.0) -> None:
        """Abort what is still running, stop the engine thread and wait for it (idempotent); ``timeout``: seconds to
        wait (``None``: as long as it takes)."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):  # not >= 0: NaN too (join raised on it, the engine closed)
            raise ValueError(f"timeout must be None or seconds >= 0; got {timeout!r}")  # before the engine closes
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(timeout=0)
        except Exception:
            pass


def _serve(ref: weakref.ref[Engine], cv: threading.Condition) -> None:
    """The engine thread. It holds its Engine only while there is work, so an Engine dropped without
    :meth:`Engine.close` (no handle left either: each holds its engine) is collected, and its ``__del__`` ends this."""
    while True:
        with cv:
            while True:
                engine = ref()
                if engine is None:
                    return
                if engine._has_work():
                    break
                del engine  # may be the last reference: __del__ closes it here, so look again before sleeping
                if ref() is None:
                    return
                cv.wait()
        try:
            if not engine._run_once():
                return
        except BaseException as exc:  # the thread dies (_run_once survives every Exception): its callers must not wait
            engine._died(exc)
            raise
        del engine


def _snapshot(prompt: Prompt) -> Prompt:
    """``prompt`` as it is at submit: the engine thread reads it later, and the caller may change it meanwhile.

    A list or tuple is copied with each message dict (deeply: content parts, tool calls) and tensor in it, a tensor
    cloned, anything else (a NumPy array, a deque) copied with ``copy.copy``, which keeps its type and so how the generator reads it;
    what cannot be copied (a generator of ids) is left for the generator to read, or refuse, as it is.
    """
    if isinstance(prompt, (list, tuple)):
        items: list[Any] = [
            _message_copy(m) if isinstance(m, dict) else m.clone() if isinstance(m, torch.Tensor) else m for m in prompt
        ]
        return items if isinstance(prompt, list) else tuple(items)
    if isinstance(prompt, torch.Tensor):
        return prompt.detach().clone()  # the rows list() makes of it are views of its storage
    if isinstance(prompt, (str, bytes)):
        return prompt
    try:
        return copy.copy(prompt)
    except Exception:
        return prompt


def _message_copy(message: dict) -> dict:
    """A chat message as it is now: nested parts deep-copied; a message holding something uncopyable shallow."""
    try:
        return copy.deepcopy(message)
    except Exception:
        return dict(message)


def _refused(exc: Exception) -> StreamEvent:
    """The final event of a request the generator could not even queue (``add_request`` raised)."""
    return _ended(f"the request could not be queued: {type(exc).__name__}: {exc}")


def _ended(message: str, request_id: int | None = None) -> StreamEvent:
    """A final ``"error"`` event with ``message``, for a request the generator will not end itself."""
    rid = -1 if request_id is None else request_id
    metrics = RequestMetrics(prompt_tokens=0, output_tokens=0, time_to_first_token=None, inter_token_latency=None,
                             latency=None, num_preemptions=0)
    output = GenerationOutput(index=0, request_id=rid, prompt_token_ids=[], token_ids=[], text="",
                              finish_reason="error", error=message, metrics=metrics)
    return StreamEvent(0, rid, None, "", finished=True, output=output)
