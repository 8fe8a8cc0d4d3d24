"""Kernel choices timed on the machine at hand, remembered in memory and on disk.

``kernel="auto"`` times its correct candidates once per (device, format, group, layer shape, rows
bucket, activation dtype) and keeps the fastest. On the CPU the choice is also written to
``$LLMSPEED_CACHE/autotune/<machine>.json``, where ``<machine>`` hashes the CPU model, its
instruction-set flags, torch's thread count, torch's version and llmspeed's C++ kernel sources: a later
process on the same kind of machine starts from the measured choices, and a different CPU, thread count,
torch or kernel code never reads them. ``LLMSPEED_AUTOTUNE=0`` turns timing off (the rule table decides alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ...machine import UnsafeCacheError, cache_root, cpu_identity, private_dir, switched_off
from ...timing import cpu_ms

AUTOTUNE_ENV = "LLMSPEED_AUTOTUNE"
MARGIN = 0.03  # another kernel replaces the rule table's guess only when it is faster by more than this
TIMED_ROWS = 256  # rows timed at most: larger inputs share the choice made at this many (GEMM-bound anyway)


def enabled() -> bool:
    """Whether ``kernel="auto"`` may time candidates (``LLMSPEED_AUTOTUNE`` unset or not ``"0"``).

    ``0``, ``false``, ``no``, ``off`` turn timing off; ``1``, ``true``, ``yes``, ``on`` (or empty) keep it on;
    any other value keeps it on with one warning naming the value."""
    setting = os.environ.get(AUTOTUNE_ENV, "1")
    if switched_off(setting):
        return False
    if setting.strip().lower() not in ("", "1", "true", "yes", "on"):
        _warn_once(f"llmspeed: {AUTOTUNE_ENV}={setting!r} is not one of 1, 0, true, false, yes, no, on, off: "
                   f"kernel timing stays on (set {AUTOTUNE_ENV}=0 to turn it off)")  # fmt: skip
    return True


def rows_bucket(m: int) -> int:
    """The rows bucket of ``m`` activation rows: the next power of two, all above ``TIMED_ROWS`` in one."""
    return min(1 << max(0, m - 1).bit_length(), 2 * TIMED_ROWS)


def default_folder() -> Path:
    """Where timed choices are kept: ``$LLMSPEED_CACHE/autotune`` (else ``~/.cache/llmspeed/autotune``)."""
    return cache_root() / "autotune"


SOURCES = Path(__file__).resolve().parents[2]  # the llmspeed package: its .cpp and .h files are the CPU kernels


@lru_cache(maxsize=4)
def sources_digest(root: Path) -> str:
    """A digest of the C++ kernel sources under ``root``: choices timed with other kernel code are not reused."""
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\x00" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine_key() -> str:
    """What CPU timings depend on besides the layer: CPU model and ISA flags, threads, torch, kernel sources."""
    return f"{cpu_identity()}|threads:{torch.get_num_threads()}|torch:{torch.__version__}|kernels:{sources_digest(SOURCES)}"


def choice_key(module: Any, x: torch.Tensor) -> str:
    """The key of one timed choice: device, format, group, double quantization, shape, rows bucket, dtype, and
    int8 activations where the module has them (their candidates differ: ``cpp_panels`` takes only those)."""
    layout, config = module.layout, module.config
    dtype = str(x.dtype).removeprefix("torch.")
    activations = getattr(config, "activations", "float")
    return (f"{x.device.type}|{layout.format}|g{layout.group}|dq{int(config.double_quant)}|"
            f"{layout.in_features}x{layout.out_features}|m{rows_bucket(x.shape[0])}|{dtype}"
            + ("" if activations == "float" else f"|act:{activations}"))  # fmt: skip


def pick(times: dict[str, float], guess: str) -> str:
    """The fastest of ``times`` (ms per call), or ``guess`` when it is within :data:`MARGIN` of the fastest."""
    best = min(times, key=times.__getitem__)
    if guess in times and times[guess] <= times[best] * (1 + MARGIN):
        return guess
    return best


class ChoiceStore:
    """Timed choices for one machine key: ``{choice key: {"kernel": name, "guess": rule's name, "ms": {name: ms}}}``.

    Loaded from disk on first use and written back (atomically, merged with what other processes
    wrote) after every new choice. An unreadable file, or an entry not shaped as :meth:`put` writes it,
    is ignored; a cache folder others could write is refused with one warning, and choices then live in
    memory only.
    """

    def __init__(self, machine: str, folder: Path | None = None):
        self.machine = machine
        digest = hashlib.sha1(machine.encode()).hexdigest()[:16]
        self.name = f"{digest}.json"
        self.folder = folder  # None: default_folder(), looked up at each use
        self.choices: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0  # time spent timing candidates for this store, in this process
        self._loaded = False
        self._lock = threading.Lock()

    def _folder(self) -> Path | None:
        try:
            return private_dir(self.folder if self.folder is not None else default_folder())
        except (UnsafeCacheError, OSError) as err:
            _warn_once(f"llmspeed: kernel choices are not cached on disk: {err}")
            return None

    def _read(self, folder: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((folder / self.name).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("machine") != self.machine:
            return {}
        choices = data.get("choices")
        if not isinstance(choices, dict):
            return {}
        return {key: entry for key, entry in choices.items() if _well_formed(entry)}

    def get(self, key: str, candidates: set[str] | None = None) -> str | None:
        """The kernel name chosen for ``key``, or ``None`` when it was never timed here.

        With ``candidates``, a choice counts only when it was raced against exactly those kernels: a
        kernel added since (a new release, a build that now succeeds) or one gone makes it time again.
        """
        with self._lock:
            if not self._loaded:
                folder = self._folder()
                if folder is not None:
                    self.choices.update(self._read(folder))
                self._loaded = True
            entry = self.choices.get(key)
        if not isinstance(entry, dict):
            return None
        if candidates is not None and set(entry.get("candidates") or ()) != candidates:
            return None
        return entry.get("kernel")

    def put(self, key: str, kernel: str, times: dict[str, float], guess: str | None = None,
            candidates: set[str] | None = None) -> None:
        """Record a choice, the rule table's ``guess`` and the ``candidates`` it was raced against (default:
        the timed ones), in memory and on disk."""
        entry = {"kernel": kernel, "guess": guess, "ms": {k: round(v, 4) for k, v in times.items()},
                 "candidates": sorted(candidates if candidates is not None else times)}
        with self._lock:
            self.choices[key] = entry
            folder = self._folder()
            if folder is None:
                return
            merged = {**self._read(folder), **self.choices}
            tmp = folder / f"{self.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                tmp.write_text(json.dumps({"machine": self.machine, "choices": merged}, indent=0, sort_keys=True))
                os.replace(tmp, folder / self.name)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                _warn_once(f"llmspeed: could not write the kernel choices cache: {err}")


def _well_formed(entry: Any) -> bool:
    """Whether a choice read from disk has the shape :meth:`ChoiceStore.put` writes (a hand-edited or
    foreign file may hold anything: such entries are dropped, so they are timed again, not crashed on)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kernel"), str):
        return False
    if not isinstance(entry.get("guess"), (str, type(None))):
        return False
    candidates, ms = entry.get("candidates", []), entry.get("ms", {})
    return (isinstance(candidates, list) and all(isinstance(c, str) for c in candidates)
            and isinstance(ms, dict) and all(isinstance(v, (int, float)) for v in ms.values()))  # fmt: skip


_STORES: dict[str, ChoiceStore] = {}
_WARNED: set[str] = set()


def store() -> ChoiceStore:
    """The :class:`ChoiceStore` of the current machine key (thread count included)."""
    key = machine_key()
    if key not in _STORES:
        _STORES[key] = ChoiceStore(key)
    return _STORES[key]


def reset(folder: Path | None = None) -> ChoiceStore:
    """Forget this machine key's choices in memory and start a new store (in ``folder``, else the cache).

    The next ``kernel="auto"`` choice reads the store's file again, or times the candidates when the
    file has none: benchmarks use it to measure tuning on first use, tests to isolate their cache.
    Modules keep the kernels they already bound: clear ``module._kernels`` to make them choose again.
    """
    key = machine_key()
    _STORES[key] = ChoiceStore(key, folder)
    return _STORES[key]


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def time_candidates(
    candidates: Mapping[str, Callable[[], Any]], timer: Callable[[Callable[[], Any]], float] | None = None
) -> dict[str, float]:
    """Milliseconds per call of each candidate; one that raises is left out with a warning.

    ``timer`` times one function (CUDA: :func:`llmspeed.timing.device_ms`); without it the candidates
    are timed together, round-robin, on the CPU (:func:`llmspeed.timing.cpu_ms`). The wall time spent
    is added to the current store's ``seconds``.
    """
    start = time.perf_counter()
    errors: dict[str, BaseException] = {}
    if timer is None:
        times = cpu_ms(candidates, errors=errors)
    else:
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = timer(fn)
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is simply not chosen
                errors[name] = exc
    for name, error in errors.items():
        _warn_once(f"llmspeed: kernel {name!r} failed while being timed and is not chosen: {error}")
    store().seconds += time.perf_counter() - start
    return times
