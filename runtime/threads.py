"""Thread counts for llama.cpp, measured on this machine instead of a constant.

llama.cpp takes two counts: `n_threads_batch` for batches of several tokens (prefill: the [system + image]
prefix and each question) and `n_threads` for one-token batches (decode). They want different values: prefill
is compute-bound and gains from every core; a one-token decode step of a small model is a few hundred
microseconds of matrix-vector work between thread barriers, and on a small machine one thread can beat two
(SmolLM2-135M Q4_0 on a 2-core Zen 3: 1 thread decodes as fast as 2; with `OMP_WAIT_POLICY=PASSIVE`, 2
threads decode at a third of the speed). Which wins depends on the CPU, the core count, the model, its
quantization and the llama.cpp build (OpenMP or ggml's own pool), so it is measured:

- `calibrate()` times a prefill of a typical prompt and a run of one-token decodes at each candidate count
  (1, 2, 4, ... up to the usable cores), interleaved round by round after a warm-up, keeps the best time of each
  and picks the fastest count for each phase (within `TIE` of the fastest, the smaller count: it leaves cores
  to the vision encoder and the rest of the device). About a second for SmolLM2-135M on 2 cores.
- `choose()` keeps the result per machine in a small JSON cache (`cache_path()`), keyed by the GGUF's sha256,
  the CPU, the usable cores, the llama.cpp build and the OpenMP settings, so the measurement runs once per
  model and machine. `chatspot-edge bench` always re-measures and records its choice there.
- A count the caller gives (`--threads`, `--decode-threads`) is used as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE_ENV = "CHATSPOT_EDGE_CACHE"  # folder of the per-machine cache (default: ~/.cache/chatspot-edge)
CALIBRATION_VERSION = 1  # bump when the measurement changes: older cached choices are then re-measured
TIE = 0.03  # counts within 3% of the fastest are a tie; the smaller one wins
PROBE_PROMPT = 64  # prefill probe: tokens in one batch (a follow-up question is ~40, a cold prompt ~110)
PROBE_DECODE = 16  # decode probe: one-token batches after the prompt
PROBE_ROUNDS = 2  # timed rounds after the warm-up; each count keeps its best round


@dataclass
class ThreadPlan:
    """What llama.cpp runs with: `prefill` threads for multi-token batches, `decode` for one-token batches.
    source: "given" (the caller's counts), "calibrated" (measured now), "cached" (measured earlier on this
    machine, see `measured_utc`) or "default" (no measurement possible: every usable core)."""

    prefill: int
    decode: int
    source: str = "default"
    measured: dict[str, Any] = field(default_factory=dict)  # {"prefill_ms": {n: ms}, "decode_ms": {n: ms}, ...}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; containers and `taskset` shrink it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def candidates(n_cpus: int | None = None) -> list[int]:
    """Thread counts worth measuring: 1, 2, 4, ... below the usable cores, and the usable cores."""
    n = n_cpus or usable_cpus()
    out, t = [], 1
    while t < n:
        out.append(t)
        t *= 2
    return out + [n]


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                      "chatspot-edge")
    return Path(root) / "threads.json"


def machine_key(gguf_id: str, system_info: str) -> str:
    """Cache key: the model file, this CPU, the cores we may use, the llama.cpp build and OpenMP's settings."""
    from chatspot_edge.benchmarks.machine import cpu_model

    parts = {"v": CALIBRATION_VERSION, "gguf": gguf_id, "cpu": cpu_model(), "cpus": usable_cpus(),
             "build": system_info.strip(),
             "omp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}
    try:
        import llama_cpp

        parts["llama_cpp"] = getattr(llama_cpp, "__version__", None)
    except ImportError:
        pass
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, plan: ThreadPlan, note: dict[str, Any]) -> None:
    """Record a measured plan (atomic replace; a read-only home only loses the cache, never the answer)."""
    from chatspot_edge.files import atomic_write_text

    data = _read_cache()
    data[key] = {"prefill": plan.prefill, "decode": plan.decode, "measured": plan.measured, **note}
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path(), json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass


def _pick(times: dict[int, float]) -> int:
    best = min(times.values())
    return min(t for t, ms in times.items() if ms <= best * (1 + TIE))


def calibrate(llm, n_prompt: int = PROBE_PROMPT, n_decode: int = PROBE_DECODE, rounds: int = PROBE_ROUNDS,
              counts: list[int] | None = None, seq: int = 0) -> ThreadPlan:
    """Measure prefill and decode at each count on `llm` (a `runtime.llama.LlamaModel`) in sequence `seq`,
    which must be empty (it is emptied again after). Sets the chosen counts on the context and returns them."""
    counts = sorted(set(counts or candidates()))
    n_prompt = max(2, min(n_prompt, llm.n_ctx - n_decode - 1, llm.n_batch))
    n_decode = max(1, min(n_decode, llm.n_ctx - n_prompt))
    vocab = max(2, llm.n_vocab - 1)
    prompt = [(7 + i * 7919) % vocab for i in range(n_prompt)]  # ordinary tokens; content does not matter
    pre: dict[int, float] = {t: float("inf") for t in counts}
    dec: dict[int, float] = {t: float("inf") for t in counts}
    t_start = time.perf_counter()
    try:
        for r in range(rounds + 1):  # round 0 warms the weights, caches and thread pools up
            order = counts if r % 2 == 0 else counts[::-1]
            for t in order:
                llm.seq_rm(seq, 0, -1)
                llm.set_threads(prefill=t, decode=t)
                t0 = time.perf_counter()
                pos = llm.decode_tokens(prompt if r else prompt[:8], seq, 0)
                ms = (time.perf_counter() - t0) * 1e3
                tok = prompt[0]
                t0 = time.perf_counter()
                for _ in range(n_decode if r else 2):
                    pos = llm.decode_tokens([tok], seq, pos)
                    tok = (tok * 31 + 17) % vocab
                if r:
                    pre[t] = min(pre[t], ms)
                    dec[t] = min(dec[t], (time.perf_counter() - t0) * 1e3 / n_decode)
    finally:
        llm.seq_rm(seq, 0, -1)
    plan = ThreadPlan(prefill=_pick(pre), decode=_pick(dec), source="calibrated",
                      measured={"prefill_ms": {str(t): round(v, 3) for t, v in pre.items()},
                                "decode_ms_per_token": {str(t): round(v, 4) for t, v in dec.items()},
                                "n_prompt": n_prompt, "n_decode": n_decode, "rounds": rounds,
                                "seconds": round(time.perf_counter() - t_start, 3)})
    llm.set_threads(prefill=plan.prefill, decode=plan.decode)
    return plan


def choose(llm, gguf_id: str, threads: int | None = None, decode_threads: int | None = None,
           n_prompt: int = PROBE_PROMPT, use_cache: bool = True, record: bool = True) -> ThreadPlan:
    """The counts for `llm`: the caller's where given, else this machine's measured choice (cached under
    `gguf_id`, measured now when absent or when `use_cache` is False). Applies them to the context."""
    if threads and decode_threads:
        plan = ThreadPlan(prefill=int(threads), decode=int(decode_threads), source="given")
    elif threads and not decode_threads:  # one count for both, as before the split
        plan = ThreadPlan(prefill=int(threads), decode=int(threads), source="given")
    else:
        from chatspot_edge.runtime.llama import system_info

        key = machine_key(gguf_id, system_info())
        hit = _read_cache().get(key) if use_cache else None
        if hit and {"prefill", "decode"} <= hit.keys():
            plan = ThreadPlan(prefill=int(hit["prefill"]), decode=int(hit["decode"]), source="cached",
                              measured=dict(hit.get("measured") or {}, measured_utc=hit.get("measured_utc")))
        else:
            plan = calibrate(llm, n_prompt=n_prompt)
            if record:
                _write_cache(key, plan, {"measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "gguf": gguf_id, "cpus": usable_cpus()})
        if decode_threads:  # a given decode count with a measured prefill count
            plan = ThreadPlan(prefill=plan.prefill, decode=int(decode_threads), source=f"{plan.source}+given",
                              measured=plan.measured)
    llm.set_threads(prefill=plan.prefill, decode=plan.decode)
    return plan
