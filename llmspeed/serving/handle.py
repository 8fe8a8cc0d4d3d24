"""A handle on one submitted request: wait for its result, iterate its events, abort it; :func:`interleave` merges
the events of several."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from typing import Any

from ..generation import GenerationOutput, StreamEvent


class RequestHandle:
    """What :meth:`llmspeed.Engine.submit` returns; every method is safe to call from any thread.

    Iterating yields the request's :class:`~llmspeed.generation.StreamEvent` objects (each with its new
    text) until the final one; :meth:`result` waits for the :class:`~llmspeed.generation.GenerationOutput`.
    Each event is handed out once: a loop left early resumes where it stopped, but iterating again after the
    final event (or while another loop takes it) raises ``RuntimeError`` instead of waiting forever.
    """

    def __init__(self, abort: Callable[[RequestHandle], None], loop: asyncio.AbstractEventLoop | None = None):
        self._abort = abort
        self._events: queue.SimpleQueue[StreamEvent | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._output: GenerationOutput | None = None
        self._loop = loop
        self._async: asyncio.Queue[StreamEvent | None] | None = asyncio.Queue() if loop is not None else None
        self._consumed = False  # the final event was handed out; a None in the queue then wakes other loops
        self._returned: list[StreamEvent] = []  # events a loop took but never handed out (_give_back): next first
        self.request_id: int | None = None  # the generator's id, once the engine thread has queued it

    # --- called by the engine thread ------------------------------------------------------------
    def _deliver(self, event: StreamEvent) -> None:
        if event.finished:  # before the event is visible: whoever sees the last event finds the result
            self._output = event.output
            self._done.set()
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening, so stop the request
                if not event.finished:
                    self._abort(self)
        else:
            self._events.put(event)

    # --- the caller's side ----------------------------------------------------------------------
    def done(self) -> bool:
        """True once the request has ended (finished, stopped, aborted or failed)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the request to end and return its output.

        Raises:
            TimeoutError: It did not end within ``timeout`` seconds (it keeps running).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request did not finish within timeout={timeout} s")
        assert self._output is not None
        return self._output

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._async is not None:
            raise TypeError("this request was submitted from asyncio: iterate it with `async for`")
        while True:
            self._refuse_consumed()
            event = self._handed(self._events.get(), self._events.put)
            yield event
            if event.finished:
                return

    async def events(self) -> Any:
        """Async iterator over the events of a request submitted with an event loop."""
        if self._async is None:
            raise TypeError("this request was not submitted from asyncio: iterate it with `for`")
        while True:
            if self._returned:  # taken earlier by a loop that ended before handing it out: the oldest event
                event = self._returned.pop(0)
                if event.finished:
                    self._consumed = True
            else:
                self._refuse_consumed()
                event = self._handed(await self._async.get(), self._async.put_nowait)
            yield event
            if event.finished:
                return

    def _handed(self, event: StreamEvent | None, put: Callable[[None], Any]) -> StreamEvent:
        """``event``, taken from the queue by a loop; after the final one a ``None`` goes back into the queue
        (``put``), which wakes any other loop waiting on it, and such a loop raises (:meth:`_refuse_consumed`)."""
        if event is None:  # another loop took the final event
            put(None)
            self._refuse_consumed()
        assert event is not None  # a None is queued only after the final event was taken (_consumed is set)
        if event.finished:
            self._consumed = True
            put(None)
        return event

    def _give_back(self, event: StreamEvent) -> None:
        """Return ``event``, taken from this handle's queue by an :meth:`events` loop but never handed out (see
        :func:`interleave`): the next loop hands it out before anything queued after it."""
        self._returned.append(event)
        if event.finished:
            self._consumed = False

    def _refuse_consumed(self) -> None:
        if self._consumed:
            raise RuntimeError(
                f"the events of request {self.request_id} were already iterated to the end (each event is handed "
                f"out once); use result() for its output"
            )

    def abort(self) -> None:
        """Stop the request (finish reason ``"abort"``); its final event still arrives. No-op once done."""
        if not self.done():
            self._abort(self)


async def interleave(handles: Sequence[RequestHandle]) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """``(i, event)`` for the events of ``handles[i]`` (submitted from asyncio) as they arrive, the handles' events
    interleaved; ends after every handle's final event. Closing it early leaves the requests running (abort them),
    and their events not yet yielded stay with their handles."""
    streams = [h.events() for h in handles]
    waiting = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=waiting.__getitem__):  # events that arrived together: in handle order
                i = waiting.pop(task)
                event = task.result()
                if not event.finished:
                    waiting[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, event
    finally:  # a task that already took an event (done, not yet yielded) gives it back to its handle, not lost
        for task, i in waiting.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                handles[i]._give_back(task.result())
            else:
                task.cancel()
