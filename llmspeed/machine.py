"""What machine this is, for cache keys, and the private on-disk cache that llmspeed writes.

Two caches live under :func:`cache_root`: compiled kernels (:mod:`llmspeed.cpp_build`) and the
kernel choices timed by ``kernel="auto"`` (:mod:`llmspeed.quant.kernels.auto`). Both hold results
that are valid for one kind of CPU only (``-march=native`` code, timings), so both are keyed by
:func:`cpu_identity`; and both hold code or choices that llmspeed runs, so both live in folders only
their owner can write (:func:`private_dir`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import stat
from functools import lru_cache
from pathlib import Path

CACHE_ENV = "LLMSPEED_CACHE"
OFF_VALUES = ("0", "false", "no", "off")  # how an environment switch is turned off (any case, spaces around)


def switched_off(setting: str) -> bool:
    """Whether an environment variable's value is one of :data:`OFF_VALUES` (``LLMSPEED_AUTOTUNE``, and
    ``LLMSPEED_DISABLE_CPP`` read the other way round)."""
    return setting.strip().lower() in OFF_VALUES


def cache_root() -> Path:
    """``$LLMSPEED_CACHE``, else ``~/.cache/llmspeed`` (a leading ``~`` is the home folder: a variable set
    where no shell expands it, as in a ``.env`` file or a quoted string, would otherwise name a folder
    called ``~`` under the working directory, another cache for each directory a program starts in)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmspeed").expanduser()


class UnsafeCacheError(RuntimeError):
    """A cache folder that another user could write: llmspeed will not load code or choices from it."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 and check that only this user can write it.

    Raises :class:`UnsafeCacheError` naming the folder when it belongs to another user or when its
    group or others may write it (say, a folder made under ``umask 000``): code loaded from there
    could have been replaced by anyone; and naming the link when ``path`` or a folder above it is a
    symbolic link to nothing. A link to an existing folder is followed and that folder checked.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in missing:
        if folder.is_symlink():  # exists() followed it to nothing: mkdir would fail, chmod would follow it
            raise UnsafeCacheError(f"cache path {path} cannot be made: {folder} is a symbolic link to "
                                   f"{os.readlink(folder)}, which does not exist; remove the link, point it at a "
                                   f"folder of your own, or set {CACHE_ENV} to one")  # fmt: skip
    if missing and not probe.is_dir():  # a file where a folder above the cache should be
        raise UnsafeCacheError(f"cache path {path} cannot be made: {probe} is a file, not a folder; "
                               f"set {CACHE_ENV} to a folder of your own")  # fmt: skip
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # another process made it in between
            pass
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheError(f"cache path {path} is not a folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeCacheError(
            f"cache folder {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}); "
            f"set {CACHE_ENV} to a folder of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"cache folder {path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 700 {path}` or set {CACHE_ENV} to a private folder"
        )
    return path


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    info = _cpuinfo()
    return info.get("model name") or info.get("cpu model") or platform.processor() or platform.machine()


def isa_flags() -> tuple[str, ...]:
    """The CPU's instruction-set flags, sorted (``/proc/cpuinfo`` ``flags``/``Features``), else ``()``."""
    info = _cpuinfo()
    return tuple(sorted((info.get("flags") or info.get("Features") or "").split()))


def cpu_identity() -> str:
    """One line naming what ``-march=native`` code and timings depend on: architecture, model and ISA flags."""
    flags = hashlib.sha1(" ".join(isa_flags()).encode()).hexdigest()[:12]
    return f"{platform.machine()}|{cpu_model()}|isa:{flags}"
