"""Benchmark suite ``http_serving``: ``llmspeed serve`` against ``transformers serve --continuous-batching`` over HTTP.

One load generator (asyncio + httpx, 127.0.0.1 only, every request bounded in time) sends the same
Poisson schedule of streaming chat requests to each server in turn: SmolLM2 in fp32 from the same
local folder for both, then llmspeed with ``--quantize int8``; with ``rounds`` the servers run side by
side and take turns, rate by rate. Per offered rate: throughput, time to
first token and inter-token latency (p50 / p99), errors. A server *sustains* a rate while its p99
time to first token stays under 2 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .batching import make_workload
from .models import hf_bars
from .serving import SUSTAIN_TTFT, _arrivals, _pct, check_load

REQUEST_TIMEOUT = 300.0  # seconds: a request still open then counts as an error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(command: list[str], port: int, log: Path, ready_timeout: float = 600.0):
    """Start a server process, wait until ``/health`` answers, yield the base URL; always stop it."""
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{command[:4]} did not become healthy in {ready_timeout} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _one(http: Any, url: str, model: str, prompt: str, max_tokens: int, arrival: float) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    stamps: list[float] = []
    done = False
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}"}
            async for line in resp.aiter_lines():
                if line.strip() == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    except Exception as err:  # a failed request is counted, never hidden
        return {"error": f"{type(err).__name__}: {err}"}
    if not done:
        return {"error": "stream ended without data: [DONE]"}
    if not stamps:  # a complete answer with no text (the model's first token ended it): no latency to count
        return {"chunks": 0, "end": time.perf_counter(), "itl": []}
    return {"ttft": stamps[0] - arrival, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps),
            "end": stamps[-1]}


async def _drive(url: str, model: str, prompts: list[str], lengths: list[int], times: list[float]) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as http:
        start = time.perf_counter()
        tasks = []
        for prompt, n, t in zip(prompts, lengths, times):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(http, url, model, prompt, n, time.perf_counter())))
        results = await asyncio.gather(*tasks)
    return results, start


def _row(system: str, rate: float, results: list[dict], start: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    kinds = Counter(r["error"] for r in results if "error" in r)
    itl = [x for r in ok for x in r["itl"]]
    elapsed = max((r["end"] for r in ok), default=start) - start
    p99 = _pct(ttft, 99)
    return {
        "table": "http load", "server": system, "offered_req_s": rate, "requests": len(results),
        "errors": len(results) - len(ok), "chunks_s": round(sum(r["chunks"] for r in ok) / elapsed, 1) if elapsed > 0 else 0,
        "completed_req_s": round(len(ok) / elapsed, 2) if elapsed > 0 else 0,
        "ttft_p50_s": round(_pct(ttft, 50), 3), "ttft_p99_s": round(p99, 3),
        "itl_p50_ms": round(_pct(itl, 50) * 1e3, 1), "itl_p99_ms": round(_pct(itl, 99) * 1e3, 1),
        "sustained": bool(ok) and len(ok) == len(results) and p99 <= SUSTAIN_TTFT,
        "empty_answers": len(ok) - len(ttft),
        "error_kinds": "; ".join(f"{kind} x{n}" for kind, n in kinds.most_common()),
    }


def _export_smollm2(folder: Path) -> None:
    """SmolLM2's weights and tokenizer as a plain transformers folder (both servers load the same one)."""
    from .. import models

    m = models.smollm2()
    m.hf.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)


async def _warm_up(url: str, model: str, prompts: list[str]) -> None:
    """Every prompt at once (large prefill steps), then a staggered batch (mixed and decode steps), so the
    measured rates meet warm caches: the chat template's shared system prompt in the prefix cache, and the
    kernels' timed choices for the row counts the load produces."""
    await _drive(url, model, prompts, [4] * len(prompts), [0.0] * len(prompts))
    k = min(16, len(prompts))
    await _drive(url, model, prompts[:k], [16] * k, [0.1 * i for i in range(k)])


def _commands(folder: Path) -> dict[str, Any]:
    """Each server's command line for a port: the same local SmolLM2 folder, served under its path."""
    tf = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--continuous-batching",
          "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port"]
    ours = [sys.executable, "-m", "llmspeed", "serve", "--model", str(folder), "--served-model-name", str(folder)]
    flags = {"llmspeed": [], "llmspeed int8": ["--quantize", "int8"],
             "llmspeed int8 float head": ["--quantize", "int8", "--no-quantize-lm-head"],
             "llmspeed int8 act8": ["--quantize", "int8", "--activations", "int8"]}
    commands: dict[str, Any] = {"transformers": lambda port: [*tf, str(port)]}
    for name, extra in flags.items():
        commands[name] = lambda port, extra=extra: [*ours, *extra, "--port", str(port)]
    return commands


def _summary(rows: list[dict], servers: tuple[str, ...], rates: tuple[float, ...]) -> list[dict]:
    """Per server, the highest rate whose p99 TTFT stayed under 2 s (in every round), against transformers'."""
    best = {}
    for system in servers:
        runs = {rate: [r["sustained"] for r in rows if r["server"] == system and r["offered_req_s"] == rate]
                for rate in rates}  # fmt: skip
        ok = [rate for rate, sustained in runs.items() if sustained and all(sustained)]
        best[system] = max(ok) if ok else 0.0
    base = best.get("transformers") or 0.0
    return [{"table": "http load, summary", "server": system, "highest_rate_with_p99_ttft_under_2s": best[system],
             "vs_transformers_serve": round(best[system] / base, 2) if base else ""} for system in servers]


def _round_ratios(rows: list[dict], servers: tuple[str, ...], rates: tuple[float, ...], rounds: int) -> list[dict]:
    """Completed requests per second against the first server's in the same round and rate; median and range."""
    import statistics

    out = []
    first = servers[0]
    for system in servers[1:]:
        for rate in rates:
            ratios = []
            for k in range(1, rounds + 1):
                got = {r["server"]: r["completed_req_s"] for r in rows
                       if r.get("round") == k and r["offered_req_s"] == rate and r["server"] in (first, system)}
                if got.get(first):
                    ratios.append(got[system] / got[first])
            if ratios:
                out.append({"table": f"http load, completed req/s against {first}, per round", "server": system,
                            "offered_req_s": rate, "rounds": len(ratios), "median": round(statistics.median(ratios), 3),
                            "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                            "each round": " ".join(f"{x:.2f}" for x in ratios)})  # fmt: skip
    return out


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = False,
        rates: tuple[float, ...] | None = None, servers: tuple[str, ...] = ("transformers", "llmspeed", "llmspeed int8"),
        requests: int | None = None, rounds: int = 1) -> list[dict]:
    """Run every server on the same schedules; rows per (server, rate), then a summary per server.

    ``requests``: requests per rate (default 24, 10 with ``quick``); a rate's queue builds only when the
    run is long enough, so finding a fast server's knee takes more.

    ``rounds`` > 1 starts every server at once and runs the rates that many times, each rate on each
    server in turn (the order reversed every other round), so that a host whose speed drifts over the
    minutes a run takes slows every server alike; a table then gives each server's completed requests
    per second against the first server's, round by round. With one round the servers run one after
    the other, each alone on the machine.

    ``progress``: a tqdm bar over the measurements (server and rate, each round), and transformers' bar while the
    model is written for the servers (none when False).
    """
    if device != "cpu" or model != "smollm2":
        raise ValueError(f"http_serving runs SmolLM2 on the CPU only; got device={device!r}, model={model!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer; got {rounds!r}")
    check_load(requests, rates)
    known = list(_commands(Path("smollm2")))
    unknown = [s for s in servers if s not in known]
    if unknown:  # before the model is exported and any server starts
        raise ValueError(f"unknown servers {unknown}; known: {known}")
    n = requests or (10 if quick else 24)
    rates = tuple(rates or ((0.5, 2.0) if quick else (0.25, 0.5, 1.0, 2.0, 4.0)))
    with tempfile.TemporaryDirectory(prefix="llmspeed-http-") as name:  # the exported model is 540 MB: removed after
        tmp = Path(name)
        folder = tmp / "smollm2"
        with hf_bars(progress):
            _export_smollm2(folder)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids, lengths = make_workload(tok, n, prompt_range=(16, 256), mean=16 if quick else 48, cap=32 if quick else 128)
        prompts: list[str] = [str(tok.decode(p)) for p in ids]
        commands = _commands(folder)
        rows: list[dict] = []
        bar = tqdm(total=len(servers) * len(rates) * rounds, disable=not progress, desc="http_serving")

        def measure(system: str, url: str, k: int, rate: float, round_: int | None) -> None:
            results, start = asyncio.run(_drive(url, str(folder), prompts, lengths, _arrivals(n, rate, seed=k)))
            row = _row(system, rate, results, start)
            if round_ is not None:
                row["round"] = round_
            rows.append(row)
            bar.update()

        with closing(bar):
            if rounds == 1:
                for system in servers:
                    port = _free_port()
                    with server_process(commands[system](port), port, tmp / f"{system.replace(' ', '_')}.log") as url:
                        asyncio.run(_warm_up(url, str(folder), prompts))
                        for k, rate in enumerate(rates):
                            measure(system, url, k, rate, None)
                return rows + _summary(rows, servers, rates)
            with ExitStack() as stack:
                urls = {}
                for system in servers:
                    port = _free_port()
                    log = tmp / f"{system.replace(' ', '_')}.log"
                    urls[system] = stack.enter_context(server_process(commands[system](port), port, log))
                for system in servers:
                    asyncio.run(_warm_up(urls[system], str(folder), prompts))
                for r in range(1, rounds + 1):
                    for k, rate in enumerate(rates):
                        for system in servers if r % 2 else servers[::-1]:
                            measure(system, urls[system], k, rate, r)
            return rows + _summary(rows, servers, rates) + _round_ratios(rows, servers, rates, rounds)
