"""Engine and Session: the on-device runtime for a bundle (GGUF LLM + ONNX / Core ML vision encoder).

ChatSpot's interaction is many clicks and boxes on ONE image, so a session encodes its image once and keeps
the KV cache of [system + image] in its own llama.cpp sequence; a follow-up question removes the previous
question's tail from the cache and prefills only its own tokens. Encoded images are cached by content hash
in a bounded LRU. Sessions beyond the context's sequence slots are parked: their sequence state is saved
and restored on their next question, so answers never leak between images.

    engine = Engine.load("bundle/", threads=2)
    session = engine.session("photo.jpg")
    for piece in session.ask("What is in this region?", box=(10, 20, 200, 240)):
        print(piece, end="")
"""

from __future__ import annotations

import codecs
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from chatspot_edge import referring
from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.model.preprocess import load_image, region_source, resize_pixels
from chatspot_edge.model.prompt import PromptFormat
from chatspot_edge.runtime.llama import LlamaModel, gguf_architecture
from chatspot_edge.runtime.vision import CoreMLVision, OnnxRegion, OnnxVision

QUANTIZED_PREFIXES = ("Q", "IQ", "TQ")


@dataclass
class Timings:
    """Milliseconds of the last answer. `decode_tok_s` = llama.cpp decode calls / decode time: each generated
    token is decoded once to produce the next (the last one produces the end-of-turn token)."""

    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    n_prompt: int = 0
    n_generated: int = 0
    n_decoded: int = 0
    image_cached: bool = False
    overhead_ms: float = 0.0  # Python time outside llama.cpp / onnxruntime calls (consumer time excluded)

    @property
    def decode_tok_s(self) -> float:
        return self.n_decoded / (self.decode_ms / 1e3) if self.n_decoded > 0 and self.decode_ms > 0 else 0.0


class _NativeClock:
    """Accumulates the time spent inside llama.cpp / onnxruntime calls: `clock(fn, *args)` calls and times."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


class Engine:
    """A loaded bundle: the LLM context (with `max_sessions` sequence slots), vision + region graphs, caches."""

    def __init__(self, bundle: Path, manifest: dict, llm: LlamaModel, vision, region, prompt: PromptFormat,
                 max_sessions: int, image_cache: int):
        self.bundle, self.manifest, self.llm, self.vision, self.region = bundle, manifest, llm, vision, region
        self.prompt = prompt
        self.image_size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
        self.resize = manifest["image"].get("resize", "bicubic")
        self.n_image_tokens = int(manifest["image"]["tokens"])
        self.region_token = bool(manifest["referring"].get("region_token"))
        self.region_placement = manifest["referring"].get("placement", "after_box")
        self.referring = referring.ReferringFormat.from_dict(manifest["referring"])  # how regions are written
        self.stop = tuple(prompt.stop)
        self._embeds: OrderedDict[str, np.ndarray] = OrderedDict()
        self._image_cache = image_cache
        self._slots: list[Session | None] = [None] * max_sessions
        self._clock = 0
        head, _ = prompt.split()
        self._head_text = head[: -len(referring.IMAGE_TOKEN)]
        self._head_tokens = llm.tokenize(self._head_text)
        for tok in self.referring.tokens[:1] + self.referring.tokens[-1:]:
            if len(llm.tokenize(tok)) != 1:
                raise BundleError(f"{bundle}: the manifest says {self.referring.name}, but the GGUF has no {tok} token")

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, llm: str | None = None, vision: str | None = None,
             vision_backend: str = "onnxruntime", n_ctx: int | None = None, max_sessions: int = 4,
             image_cache: int = 32, verify: bool = True, f32_kv: bool = False) -> "Engine":
        from chatspot_edge.export.manifest import find_variant, read_manifest, region_graph, verify_bundle

        bundle = Path(bundle)
        manifest = read_manifest(bundle)  # structure; checksums below for the files this engine loads
        _, llm_entry, _ = find_variant(manifest, "llm", llm)
        _, vis_entry, _ = find_variant(manifest, "vision", vision)
        if vision_backend == "coreml":
            coreml = vis_entry.get("coreml") or manifest.get("vision", {}).get("coreml") or "vision.mlpackage"
            vis_file = coreml if isinstance(coreml, str) else coreml["file"]
        else:
            vis_file = vis_entry["file"]
        region_file = region_graph(manifest, vis_entry)  # the variant's own (quantized) copy, or the bundle's
        if verify:
            verify_bundle(bundle, only=[llm_entry["file"], vis_file] + ([region_file] if region_file else []))
        gguf_path = bundle / llm_entry["file"]
        arch = gguf_architecture(gguf_path)
        if arch != "llama":
            raise BundleError(f"{gguf_path}: GGUF architecture {arch!r}, this runtime runs 'llama'")
        quant = str(llm_entry.get("quant", ""))
        model = LlamaModel(gguf_path, n_ctx=int(n_ctx or llm_entry.get("n_ctx") or 2048), threads=threads,
                           n_seq_max=max_sessions, quantized=quant.upper().startswith(QUANTIZED_PREFIXES),
                           f32_kv=f32_kv)
        if model.n_embd != int(llm_entry.get("n_embd", model.n_embd)):
            raise BundleError(f"{gguf_path}: n_embd {model.n_embd} != manifest {llm_entry['n_embd']}")
        if vision_backend == "onnxruntime":
            vis = OnnxVision(bundle / vis_file, threads=model.threads)
        elif vision_backend == "coreml":
            vis = CoreMLVision(bundle / vis_file)
        else:
            raise InputError(f"unknown vision backend {vision_backend!r} (onnxruntime or coreml)")
        width = (vis.output_shape or [None])[-1]
        if isinstance(width, int) and width != model.n_embd:
            raise BundleError(f"{vis_entry['file']}: image_embeds width {width} does not match the LLM's n_embd {model.n_embd}")
        region = OnnxRegion(bundle / region_file, threads=model.threads) if region_file else None
        p = manifest["prompt"]
        prompt = PromptFormat(p["system"], p["template"], tuple(p.get("stop") or ()), p.get("turn", ""))
        return cls(bundle, manifest, model, vis, region, prompt, max_sessions, image_cache)

    # -- images ------------------------------------------------------------------------------------------
    def pixels(self, image: str | Path | bytes | Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """(uint8 [H, W, 3] at the model's size, original (width, height))."""
        img = load_image(image)
        return resize_pixels(img, self.image_size, self.resize), img.size

    def image_embeddings(self, pixels: np.ndarray) -> tuple[np.ndarray, bool, float]:
        """(`[N, d]` embeddings, from cache?, milliseconds) for resized pixels; LRU by content hash."""
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key in self._embeds:
            self._embeds.move_to_end(key)
            return self._embeds[key], True, 0.0
        t = time.perf_counter()
        out = np.asarray(self.vision(pixels))
        ms = (time.perf_counter() - t) * 1e3
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[2] != self.llm.n_embd:
            raise BundleError(f"vision graph returned {out.shape}, expected [1, N, {self.llm.n_embd}]")
        emb = np.ascontiguousarray(out[0], dtype=np.float32)
        self._embeds[key] = emb
        while len(self._embeds) > self._image_cache:
            self._embeds.popitem(last=False)
        return emb, False, ms

    def session(self, image: str | Path | bytes | Image.Image, history: bool = False) -> "Session":
        """A conversation about one image. With `history`, earlier questions and answers stay in context."""
        img = load_image(image)
        pixels = resize_pixels(img, self.image_size, self.resize)
        reads_crops = self.region is not None and self.region.crop_size is not None
        return Session(self, pixels, img.size, history, original=region_source(img) if reads_crops else None)

    # -- sequence slots ----------------------------------------------------------------------------------
    def _acquire(self, session: "Session") -> int:
        self._clock += 1
        session._last_used = self._clock
        if session._slot is not None and self._slots[session._slot] is session:
            return session._slot
        free = [i for i, s in enumerate(self._slots) if s is None]
        if free:
            slot = free[0]
        else:  # park the least recently used session: save its sequence, then reuse the slot
            slot = min(range(len(self._slots)), key=lambda i: self._slots[i]._last_used)
            victim = self._slots[slot]
            victim._saved = self.llm.seq_save(slot)
            victim._slot = None
        self.llm.seq_rm(slot, 0, -1)
        self._slots[slot] = session
        session._slot = slot
        if session._saved is not None:
            self.llm.seq_load(slot, session._saved)
            session._saved = None
        return slot

    def _release(self, session: "Session") -> None:
        if session._slot is not None and self._slots[session._slot] is session:
            self.llm.seq_rm(session._slot, 0, -1)
            self._slots[session._slot] = None
        session._slot = None
        session._saved = None

    def close(self) -> None:
        self.llm.close()


@dataclass
class _Turn:
    question: str
    answer: str


class Session:
    """Questions about one image. Regions are given in PIXELS of the original image."""

    def __init__(self, engine: Engine, pixels: np.ndarray, size: tuple[int, int], history: bool,
                 original: Image.Image | None = None):
        self.engine, self.pixels, self.size, self.history = engine, pixels, size, history
        self.original = original  # what region crops are read from (region graphs with a `crops` input)
        self.width, self.height = size
        self.turns: list[_Turn] = []
        self.timings = Timings()
        self._slot: int | None = None
        self._saved: bytes | None = None
        self._last_used = 0
        self._prefix_len = 0  # KV positions of [system + image] (0: not prefilled)
        self._len = 0  # KV positions in use
        self._embeds: np.ndarray | None = None

    # -- public API --------------------------------------------------------------------------------------
    def region_text(self, point=None, box=None, polygon=None, clip: bool = False) -> str | None:
        """The text of the one region given (pixels in) in the bundle's referring format, or None."""
        given = [k for k, v in (("point", point), ("box", box), ("polygon", polygon)) if v is not None]
        if len(given) > 1:
            raise InputError(f"give one region, not {' and '.join(given)}")
        if not given:
            return None
        kind = given[0]
        values = {"point": point, "box": box, "polygon": polygon}[kind]
        flat = [c for p in values for c in (p if isinstance(p, (list, tuple)) else [p])]
        return referring.from_pixels(kind, flat, self.width, self.height, clip=clip).write(self.engine.referring)

    def ask(self, question: str, point=None, box=None, polygon=None, clip: bool = False, max_tokens: int = 128,
            temperature: float = 0.0, seed: int = 0, stream: bool = True) -> Iterator[str] | str:
        """Answer `question` about the region (if any). The region text goes where the question says
        `{region}`, else in front of the question. Streams text pieces, or returns the whole answer."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        region = self.region_text(point, box, polygon, clip)
        if region is not None:
            question = question.replace("{region}", region) if "{region}" in question else f"{region} {question}"
        gen = self._generate(question, max_tokens, temperature, seed)
        return gen if stream else "".join(gen)

    def ask_text(self, question: str, max_tokens: int = 64) -> str:
        """Answer a question whose regions are already written as text, in either format (evaluation)."""
        return "".join(self._generate(question, max_tokens, 0.0, 0))

    def reset(self) -> None:
        """Forget the conversation (the image stays encoded and its KV prefix kept)."""
        self.turns.clear()
        if self._slot is not None and self._prefix_len:
            self.engine.llm.seq_rm(self._slot, self._prefix_len, -1)
        self._len = self._prefix_len

    def close(self) -> None:
        self.engine._release(self)
        self._prefix_len = self._len = 0

    # -- internals ---------------------------------------------------------------------------------------
    def _ensure_prefix(self, slot: int, t: Timings, clock: _NativeClock) -> None:
        eng = self.engine
        if self._embeds is None:
            self._embeds, t.image_cached, t.vision_ms = eng.image_embeddings(self.pixels)
            clock.seconds += t.vision_ms / 1e3
        if self._prefix_len and self._len >= self._prefix_len:
            return
        pos = clock(eng.llm.decode_tokens, eng._head_tokens, slot, 0, logits_last=False)
        pos = clock(eng.llm.decode_embeddings, self._embeds, slot, pos)
        self._prefix_len = self._len = pos
        t.n_prompt += pos

    def _segments(self, question: str, clock: _NativeClock) -> tuple[list[list[int] | np.ndarray], list]:
        """Question -> alternating token lists and region-embedding rows (text after the cached prefix)."""
        eng = self.engine
        q = eng.referring.convert(question.replace(referring.IMAGE_TOKEN, "").strip())  # the bundle's format
        boxes = eng.referring.boxes(q) if eng.region_token else []
        if self.history and self.turns:
            render = lambda x: eng.prompt.turn.format(question=x)  # noqa: E731 - a later turn of a chat
        else:
            render = eng.prompt.followup
        bins = eng.referring.bins
        text = referring.with_region_tokens(q, render, eng.region_placement, bins) if eng.region_token else render(q)
        parts = text.split(referring.REGION_TOKEN) if eng.region_token else [text]
        segs: list = []
        region_embeds = None
        if boxes:
            region_embeds = clock(eng.region, self._embeds, np.asarray(boxes, dtype=np.float32), self.pixels,
                                  self.original)
        for i, part in enumerate(parts):
            if part:
                segs.append(clock(eng.llm.tokenize, part))
            if i < len(parts) - 1:
                segs.append(region_embeds[i:i + 1])
        return segs, boxes

    def _generate(self, question: str, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        eng, llm = self.engine, self.engine.llm
        t0 = time.perf_counter()
        t = Timings()
        clock = _NativeClock()  # time inside llama.cpp / onnxruntime
        paused = 0.0  # time the consumer held the generator at a `yield`
        slot = eng._acquire(self)
        if not self.history or not self.turns:
            if self._prefix_len and self._len > self._prefix_len:
                clock(llm.seq_rm, slot, self._prefix_len, -1)  # drop the previous question's tail, keep the image
                self._len = self._prefix_len
        n0 = time.perf_counter()
        self._ensure_prefix(slot, t, clock)
        segs, _ = self._segments(question, clock)
        n_new = sum(len(s) for s in segs)
        if self._len + n_new + max_tokens > llm.n_ctx:
            raise InputError(f"the question needs {self._len + n_new + max_tokens} context positions "
                             f"({n_new} prompt tokens + max_tokens {max_tokens} after {self._len}); the context holds {llm.n_ctx}")
        pos = self._len
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            if isinstance(seg, np.ndarray):
                pos = clock(llm.decode_embeddings, seg, slot, pos, logits_last=last)
            else:
                pos = clock(llm.decode_tokens, seg, slot, pos, logits_last=last)
        t.n_prompt += n_new
        rng = np.random.default_rng(seed)
        tok = clock(llm.sample, temperature, rng)
        t.prefill_ms = (time.perf_counter() - n0) * 1e3 - t.vision_ms
        t.ttft_ms = (time.perf_counter() - t0) * 1e3
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back a character split across tokens
        text = ""
        emitted = 0
        t_dec = time.perf_counter()
        stopped = False
        for step in range(max_tokens):
            if clock(llm.is_eog, tok):
                stopped = True
                break
            text += utf8.decode(clock(llm.piece, tok))
            t.n_generated += 1
            cut = _stop_at(text, eng.stop)
            if cut is not None:
                text = text[:cut]
                stopped = True
                break
            safe = len(text) - _stop_prefix_len(text, eng.stop)  # a tail that may begin a stop string waits
            if safe > emitted:
                y = time.perf_counter()
                yield text[emitted:safe]
                paused += time.perf_counter() - y
                emitted = safe
            pos = clock(llm.decode_tokens, [tok], slot, pos)
            tok = clock(llm.sample, temperature, rng)
            t.n_decoded += 1
        if not stopped or _stop_at(text, eng.stop) is None:
            text += utf8.decode(b"", final=True)
        if len(text) > emitted:
            y = time.perf_counter()
            yield text[emitted:]
            paused += time.perf_counter() - y
        t.decode_ms = (time.perf_counter() - t_dec - paused) * 1e3
        if self.history and stopped:  # the closing token belongs to the conversation
            pos = clock(llm.decode_tokens, [tok], slot, pos, logits_last=False)
        self._len = pos
        self.turns.append(_Turn(question, text))
        t.overhead_ms = (time.perf_counter() - t0 - paused - clock.seconds) * 1e3
        self.timings = t


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    idx = [text.find(s) for s in stops if s and s in text]
    return min(idx) if idx else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
