"""One bundle variant measured in a fresh process (so peak RSS and caches are that variant's alone).

    python -m chatspot_edge.benchmarks.worker JOB.json

JOB: {"bundle", "llm" (variant name or null: the default), "vision" (likewise), "threads" (null: the
runtime's measured choice), "decode_threads" (null: likewise, or `threads` when that is given), "repeats",
"max_tokens", "out"}. Writes a JSON object of raw measurements to `out`. Imports the runtime only (no torch),
like an application on the device would, in the environment `bench` gives it (no OpenMP setting of ours).

Measured, each `repeats` times after one warm-up (the parent takes medians and spreads):
- load: `Engine.load` (checksums verified once by the parent, not here), the first load separately (under
  "auto" threads it measures this machine's thread counts afresh and records them; later loads reuse them);
- vision: `engine.image_embeddings` with the image LRU cleared (what a new image costs);
- cold TTFT: a new session on a new image (LRU cleared) + a box question: preprocessing (resize) +
  vision + [system + image] prefill + question prefill + first token;
- follow-up TTFT: a new region question on the same session (only its own tokens are prefilled);
- suite: 8 referring questions (boxes, points, a polygon) on 2 generated images, `max_tokens` each,
  end to end with new sessions and a cold LRU; decode tok/s over the suite's answers;
- peak RSS (VmHWM on Linux, see `peak_rss_mb`) after the runtime measurements.

The raw llama.cpp baseline is not measured here but in a clean process of its own (`benchmarks/raw_llama.py`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H = 640, 480
COLD = ("What is in this region?", dict(box=(60, 70, 250, 260)))
FOLLOWUPS = [
    ("What color is {region}?", dict(point=(430, 160))),
    ("Describe {region}.", dict(polygon=[(300, 300), (520, 320), (430, 450)])),
    ("What shape is in this region?", dict(box=(380, 40, 610, 270))),
    ("Is there text at {region}?", dict(box=(40, 330, 260, 420))),
]
SUITE = [
    ("What is this?", dict(box=(60, 70, 250, 260))),
    ("What color is {region}?", dict(point=(430, 160))),
    ("Describe {region}.", dict(polygon=[(300, 300), (520, 320), (430, 450)])),
    ("What shape is in this region?", dict(box=(380, 40, 610, 270))),
]
MIN_DECODE_TOKENS = 16  # fewer generated tokens in a suite round: decode is timed on a forced greedy loop


def make_images() -> list[Image.Image]:
    """Two deterministic SpotWorld-like images: coloured shapes and a word on a light background."""
    out = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        img = Image.new("RGB", (W, H), tuple(int(c) for c in rng.integers(200, 250, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, W - 120)), int(rng.integers(0, H - 120))
            s = int(rng.integers(50, 120))
            color = tuple(int(c) for c in rng.integers(0, 200, 3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                d.rectangle((x, y, x + s, y + s), fill=color)
            elif kind == 1:
                d.ellipse((x, y, x + s, y + s), fill=color)
            else:
                d.polygon([(x, y + s), (x + s // 2, y), (x + s, y + s)], fill=color)
        d.text((60, 360), "CHATSPOT" if seed == 1 else "EDGE", fill=(0, 0, 0))
        out.append(img)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own address space.
    `ru_maxrss` is not used there: execve carries the PARENT's high-water mark over into the child's
    `ru_maxrss` (the kernel folds the old address space's peak into it), so a worker started from a parent
    with torch loaded would report the parent's memory. Elsewhere (macOS): `ru_maxrss` (bytes there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def ru_maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1 << 20)
    except Exception:  # noqa: BLE001
        return None


def _clear_images(engine) -> None:
    """Empty the engine's image-embedding LRU so the next image is really encoded."""
    cache = getattr(engine, "_embeds", None)
    if cache is not None:
        cache.clear()


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


def measure_runtime(job: dict, log) -> dict:
    from chatspot_edge.runtime import Engine

    bundle, repeats = job["bundle"], int(job["repeats"])
    threads, decode_threads = job.get("threads"), job.get("decode_threads")
    max_tokens = int(job.get("max_tokens", 24))
    res: dict = {"load_ms": []}
    kw = dict(threads=threads, decode_threads=decode_threads, llm=job.get("llm"), vision=job.get("vision"),
              verify=False, n_ctx=job.get("n_ctx"))
    t = time.perf_counter()
    engine = Engine.load(bundle, recalibrate=True, **kw)  # a measured choice is taken afresh, then cached
    res["load_first_ms"] = _ms(t)
    plan = engine.thread_plan
    res["thread_plan"] = plan.as_dict()
    res["threads_prefill"], res["threads_decode"] = plan.prefill, plan.decode
    from chatspot_edge.runtime.llama import uses_openmp

    res["openmp"] = uses_openmp()
    for _ in range(min(repeats, 3)):
        engine.close()
        t = time.perf_counter()
        engine = Engine.load(bundle, **kw)
        res["load_ms"].append(_ms(t))
    res["extra_bufts"] = getattr(engine.llm, "extra_bufts", None)
    res["n_ctx"] = engine.llm.n_ctx
    images = make_images()
    log("warm-up")
    s = engine.session(images[0])
    s.ask(COLD[0], max_tokens=4, stream=False, **COLD[1])
    s.ask(FOLLOWUPS[0][0], max_tokens=4, stream=False, **FOLLOWUPS[0][1])
    s.close()

    log("vision")
    pixels = [engine.pixels(im)[0] for im in images]
    res["vision_ms"] = []
    for r in range(repeats):
        _clear_images(engine)
        _, cached, ms = engine.image_embeddings(pixels[r % 2])
        if not cached:
            res["vision_ms"].append(ms)

    log("cold and follow-up TTFT")
    keys = ("ttft_cold_ms", "preprocess_ms", "runtime_ttft_cold_ms", "cold_vision_ms", "cold_prefill_ms",
            "cold_overhead_ms", "n_prompt_cold", "ttft_followup_ms", "followup_prefill_ms", "n_prompt_followup",
            "cold_image_cached")
    for k in keys:
        res[k] = []
    for r in range(repeats):
        _clear_images(engine)
        t = time.perf_counter()
        s = engine.session(images[r % 2])
        pre = _ms(t)
        s.ask(COLD[0], max_tokens=1, stream=False, **COLD[1])
        tm = s.timings
        res["preprocess_ms"].append(pre)
        res["runtime_ttft_cold_ms"].append(tm.ttft_ms)
        res["ttft_cold_ms"].append(pre + tm.ttft_ms)
        res["cold_vision_ms"].append(tm.vision_ms)
        res["cold_prefill_ms"].append(tm.prefill_ms)
        res["cold_overhead_ms"].append(tm.overhead_ms)
        res["n_prompt_cold"].append(tm.n_prompt)
        res["cold_image_cached"].append(bool(tm.image_cached))
        q, region = FOLLOWUPS[r % len(FOLLOWUPS)]
        s.ask(q, max_tokens=1, stream=False, **region)
        tm = s.timings
        res["ttft_followup_ms"].append(tm.ttft_ms)
        res["followup_prefill_ms"].append(tm.prefill_ms)
        res["n_prompt_followup"].append(tm.n_prompt)
        s.close()

    log("suite")
    res["suite_ms"], res["suite_decode_tok_s"], res["suite_tokens"] = [], [], []
    answers = []
    for r in range(repeats):
        _clear_images(engine)
        gen = dec_ms = 0.0
        n_tok = 0
        t = time.perf_counter()
        for img in images:
            s = engine.session(img)
            for q, region in SUITE:
                text = s.ask(q, max_tokens=max_tokens, stream=False, **region)
                tm = s.timings
                n_tok += tm.n_generated
                if tm.n_decoded > 0:  # one llama.cpp decode per generated token (see runtime Timings)
                    gen += tm.n_decoded
                    dec_ms += tm.decode_ms
                if r == 0:
                    answers.append(text)
            s.close()
        res["suite_ms"].append(_ms(t))
        res["suite_tokens"].append(n_tok)
        if gen >= MIN_DECODE_TOKENS and dec_ms > 0:
            res["suite_decode_tok_s"].append(gen / (dec_ms / 1e3))
    res["suite_questions"] = len(images) * len(SUITE)
    res["suite_answers_sample"] = answers[:3]
    n_prompt = int(statistics.median(res["n_prompt_cold"])) if res["n_prompt_cold"] else 64
    if res["suite_decode_tok_s"]:
        res["decode_tok_s"] = res["suite_decode_tok_s"]
        res["decode_source"] = "suite answers (Session.ask, runtime timings)"
    else:  # answers end too early to time decode: greedy on the runtime's LlamaModel, end-of-generation ignored
        log("decode (forced: the suite's answers were too short)")
        res["decode_tok_s"] = _forced_runtime_decode(engine.llm, n_prompt, max(32, max_tokens), repeats)
        res["decode_source"] = "runtime LlamaModel greedy loop (answers too short to time)"
    res["decode_context"] = n_prompt + max_tokens // 2
    res["peak_rss_mb"] = peak_rss_mb()
    res["rss_mb_end"] = current_rss_mb()
    res["ru_maxrss_mb"] = ru_maxrss_mb()
    engine.close()
    res["n_prompt"] = n_prompt
    return res


def _forced_runtime_decode(llm, n_prompt: int, n_tokens: int, repeats: int) -> list[float]:
    rates = []
    prompt = [300 + (i * 7919) % 5000 for i in range(n_prompt)]
    for r in range(repeats + 1):
        llm.seq_rm(0, 0, -1)
        pos = llm.decode_tokens(prompt, 0, 0)
        tok = llm.greedy()
        t = time.perf_counter()
        for _ in range(n_tokens):
            pos = llm.decode_tokens([tok], 0, pos)
            tok = llm.greedy()
        if r:
            rates.append(n_tokens / (time.perf_counter() - t))
    llm.seq_rm(0, 0, -1)
    return rates


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    tag = f"[{job.get('llm') or 'default'}:{job.get('vision') or 'default'} x{job.get('threads') or 'auto'}]"

    def log(msg):
        if job.get("verbose", True):
            print(f"bench {tag} {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    res = measure_runtime(job, log)
    res["worker_seconds"] = time.perf_counter() - t0
    res["pid"] = os.getpid()
    tmp = Path(job["out"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
