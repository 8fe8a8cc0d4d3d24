"""``python -m llmspeed build``: compile every C++ kernel now, not on first use (for container images and CI)."""

from __future__ import annotations

import argparse

from .cpp_build import build_dir


def main(argv: list[str] | None = None) -> int:
    """Build (or verify and load) the quantized-matmul and fused-decode extensions; 1 if either is unavailable.

    The AMX int8 kernel is built too where the CPU has AMX-BF16; elsewhere it is reported, not an error.
    """
    parser = argparse.ArgumentParser(prog="python -m llmspeed build", description=__doc__)
    parser.parse_args(argv)
    from . import cpp_build
    from .generation import fused_decode

    cpp_build.RETRY_FAILED = True  # this command is how a user tries a build that failed before again
    from .quant.kernels import amx, cpp

    failed = 0
    for name, unavailable in (("quantized matmul (cpp)", cpp.unavailable), ("fused decode step", fused_decode.unavailable)):
        reason = unavailable()
        print(f"{name}: {'ready' if reason is None else 'unavailable: ' + reason}")
        failed += reason is not None
    reason = amx.unavailable()
    print(f"int8 matmul on AMX tiles (amx, optional): {'ready' if reason is None else 'unavailable: ' + reason}")
    print(f"kernel cache: {build_dir()}")
    return 1 if failed else 0
