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
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from chatspot_edge import referring
from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.model.preprocess import load_image, region_source, resize_pixels
from chatspot_edge.model.prompt import PromptFormat
from chatspot_edge.openmp import torch_loaded_without_policy
from chatspot_edge.runtime.llama import LlamaModel, gguf_architecture
from chatspot_edge.runtime.threads import ThreadPlan
from chatspot_edge.runtime.threads import choose as choose_threads
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
    stop_reason: str = ""  # "eog" (end token), "stop" (stop string), "max_tokens", "context" (the context is full)
    turns_dropped: int = 0  # history mode: oldest turns dropped from the context before this question
    n_context: int = 0  # KV positions the session holds after the answer

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
    """A loaded bundle: the LLM context (with `max_sessions` sequence slots sharing one KV cache of `n_ctx`
    cells), vision + region graphs, caches, and the thread counts llama.cpp runs with (`thread_plan`)."""

    def __init__(self, bundle: Path, manifest: dict, llm: LlamaModel, vision, region, prompt: PromptFormat,
                 max_sessions: int, image_cache: int, thread_plan: ThreadPlan | None = None):
        self.bundle, self.manifest, self.llm, self.vision, self.region = bundle, manifest, llm, vision, region
        self.prompt = prompt
        self.image_size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
        self.resize = manifest["image"].get("resize", "bicubic")
        self.n_image_tokens = int(manifest["image"]["tokens"])
        self.region_token = bool(manifest["referring"].get("region_token"))
        self.region_placement = manifest["referring"].get("placement", "after_box")
        self.referring = referring.ReferringFormat.from_dict(manifest["referring"])  # how regions are written
        self.stop = tuple(prompt.stop)
        self.thread_plan = thread_plan or ThreadPlan(prefill=llm.threads, decode=llm.decode_threads, source="given")
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
        # what closes an answer in the cache when it ended without its end token (history mode)
        self._close_tokens = llm.tokenize(self.stop[0]) if self.stop and self.stop[0] else []

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, llm: str | None = None, vision: str | None = None,
             vision_backend: str = "onnxruntime", n_ctx: int | None = None, max_sessions: int = 4,
             image_cache: int = 32, verify: bool = True, f32_kv: bool = False, decode_threads: int | None = None,
             recalibrate: bool = False) -> "Engine":
        """Load a bundle's LLM and vision variants (default: the manifest's). Threads: `threads` for prefill
        (and decode too unless `decode_threads` is given); counts not given are this machine's measured best
        for this GGUF (`runtime.threads`: measured once, about a second, then cached; `recalibrate` measures
        again and records the result)."""
        from chatspot_edge.export.manifest import find_variant, read_manifest, region_graph, verify_bundle

        bundle = Path(bundle)
        for name, value in (("threads", threads), ("decode_threads", decode_threads)):
            if value is not None and int(value) < 1:
                raise InputError(f"{name} {value}: must be at least 1")
        if torch_loaded_without_policy():
            warnings.warn("torch is loaded in this process and OMP_WAIT_POLICY is not set: torch's and llama.cpp's "
                          "OpenMP threads will compete for the cores (see chatspot_edge.openmp)", RuntimeWarning,
                          stacklevel=2)
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
                           decode_threads=decode_threads, n_seq_max=max_sessions,
                           quantized=quant.upper().startswith(QUANTIZED_PREFIXES), f32_kv=f32_kv)
        if model.n_embd != int(llm_entry.get("n_embd", model.n_embd)):
            raise BundleError(f"{gguf_path}: n_embd {model.n_embd} != manifest {llm_entry['n_embd']}")
        file_entry = manifest.get("files", {}).get(llm_entry["file"], {})
        gguf_id = file_entry.get("sha256") or f"{gguf_path.resolve()}:{gguf_path.stat().st_size}:{gguf_path.stat().st_mtime_ns}"
        plan = choose_threads(model, gguf_id, threads=threads, decode_threads=decode_threads, use_cache=not recalibrate)
        if vision_backend == "onnxruntime":
            vis = OnnxVision(bundle / vis_file, threads=plan.prefill)
        elif vision_backend == "coreml":
            vis = CoreMLVision(bundle / vis_file)
        else:
            raise InputError(f"unknown vision backend {vision_backend!r} (onnxruntime or coreml)")
        width = (vis.output_shape or [None])[-1]
        if isinstance(width, int) and width != model.n_embd:
            raise BundleError(f"{vis_entry['file']}: image_embeds width {width} does not match the LLM's n_embd {model.n_embd}")
        region = OnnxRegion(bundle / region_file, threads=plan.prefill) if region_file else None
        p = manifest["prompt"]
        prompt = PromptFormat(p["system"], p["template"], tuple(p.get("stop") or ()), p.get("turn", ""))
        return cls(bundle, manifest, model, vis, region, prompt, max_sessions, image_cache, plan)

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

    def session(self, image: str | Path | bytes | Image.Image, history: bool = False,
                turns: Sequence["Turn | tuple[str, str]"] = ()) -> "Session":
        """A conversation about one image. With `history`, earlier questions and answers stay in context
        (the oldest are dropped when the context is full). `turns` starts a history session from an earlier
        conversation: `Turn`s (their answer tokens are kept exactly) or (question, answer) text pairs."""
        img = load_image(image)
        pixels = resize_pixels(img, self.image_size, self.resize)
        reads_crops = self.region is not None and self.region.crop_size is not None
        s = Session(self, pixels, img.size, history, original=region_source(img) if reads_crops else None)
        if turns:
            if not history:
                raise InputError("turns= needs history=True")
            s.turns = [t if isinstance(t, Turn) else Turn(str(t[0]), str(t[1])) for t in turns]
        return s
    # -- sequence slots and KV cells ----------------------------------------------------------------------
    def _resident(self) -> list["Session"]:
        return [s for s in self._slots if s is not None]

    def cells_used(self, but: "Session | None" = None) -> int:
        """KV cells held by the sessions in slots (positions are contiguous from 0 in each sequence)."""
        return sum(s._len for s in self._resident() if s is not but)

    def _park(self, victim: "Session") -> None:
        """Save a session's sequence and free its slot and KV cells; it is restored on its next question."""
        slot = victim._slot
        victim._saved = self.llm.seq_save(slot) if victim._len else None
        self.llm.seq_rm(slot, 0, -1)
        self._slots[slot] = None
        victim._slot = None

    def _evictable(self, keep: "Session") -> list["Session"]:
        """Other resident sessions that may be parked, least recently used first (a session in the middle of
        an answer never is)."""
        return sorted((s for s in self._resident() if s is not keep and not s._busy), key=lambda s: s._last_used)

    def _make_room(self, session: "Session", cells: int) -> int:
        """Park other sessions until `session` may hold `cells` KV cells in all; returns the cells it may hold."""
        for victim in self._evictable(session):
            if self.llm.n_ctx - self.cells_used(but=session) >= cells:
                break
            self._park(victim)
        return self.llm.n_ctx - self.cells_used(but=session)

    def _acquire(self, session: "Session") -> int:
        self._clock += 1
        session._last_used = self._clock
        if session._slot is not None and self._slots[session._slot] is session:
            return session._slot
        free = [i for i, s in enumerate(self._slots) if s is None]
        if not free:  # park the least recently used session to reuse its slot
            victims = self._evictable(session)
            if not victims:
                raise InputError(f"all {len(self._slots)} sequence slots are in the middle of an answer")
            self._park(victims[0])
            free = [self._slots.index(None)]
        slot = free[0]
        self.llm.seq_rm(slot, 0, -1)
        self._slots[slot] = session
        session._slot = slot
        if session._saved is not None:
            self._make_room(session, session._len)
            while True:  # restoring needs contiguous cells: park more sessions until they are there
                try:
                    self.llm.seq_load(slot, session._saved)
                    break
                except RuntimeError:
                    victims = self._evictable(session)
                    if not victims:
                        raise
                    self._park(victims[0])
            session._saved = None
            self.llm.seq_rm(slot, session._len, -1)  # a parked session that was reset keeps only its prefix
        else:
            session._len = session._prefix_len = session._kv_turns = 0  # nothing of it is in the cache
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
class Turn:
    """One question and its answer. `tokens`: the answer as it sits in the KV cache (generated tokens and the
    closing end-of-turn token; empty for a turn given as text, which is then tokenized with its closing)."""

    question: str
    answer: str
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""
    _sizes: dict = field(default_factory=dict, repr=False, compare=False)  # (first?) -> prompt tokens


_Turn = Turn  # earlier name


class Session:
    """Questions about one image. Regions are given in PIXELS of the original image.

    Context: the KV cache holds [system + image] (the prefix, prefilled once) and, in history mode, the turns
    in context (`context_turns`), then the question. A question is refused (InputError) only when the prefix
    and its prompt tokens alone exceed the context; otherwise it is answered, and the answer stops at the end
    of the context if it gets there (`timings.stop_reason == "context"`). In history mode, when the question
    and its answer budget (`max_tokens`, at most what the context leaves) do not fit after the turns in
    context, the oldest turns are dropped until the ones kept fill at most half of the room left (llama.cpp's
    own context shift also frees half), the prefix is kept and the kept turns are prefilled again after it, so
    the model sees exactly the kept turns, as a new session started with them (`Engine.session(turns=...)`)
    would."""

    def __init__(self, engine: Engine, pixels: np.ndarray, size: tuple[int, int], history: bool,
                 original: Image.Image | None = None):
        self.engine, self.pixels, self.size, self.history = engine, pixels, size, history
        self.original = original  # what region crops are read from (region graphs with a `crops` input)
        self.width, self.height = size
        self.turns: list[Turn] = []  # the whole conversation (history mode: `context_turns` are still in context)
        self.timings = Timings()
        self._slot: int | None = None
        self._saved: bytes | None = None
        self._last_used = 0
        self._busy = False  # answering: never parked
        self._prefix_len = 0  # KV positions of [system + image] (0: not prefilled)
        self._len = 0  # KV positions in use
        self._first_kept = 0  # history mode: index in `turns` of the oldest turn in context
        self._kv_turns = 0  # history mode: how many of `context_turns` are in the KV cache now
        self._embeds: np.ndarray | None = None

    # -- public API --------------------------------------------------------------------------------------
    @property
    def context_turns(self) -> list[Turn]:
        """History mode: the turns the next question sees (the oldest ones may have been dropped); else []."""
        return self.turns[self._first_kept:] if self.history else []

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
        `{region}`, else in front of the question. Streams text pieces, or returns the whole answer.
        `max_tokens` bounds the answer; it stops earlier at its end token or at the end of the context
        (`timings.stop_reason`: "eog", "stop", "max_tokens" or "context")."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        if int(max_tokens) < 1:
            raise InputError(f"max_tokens {max_tokens}: must be at least 1")
        region = self.region_text(point, box, polygon, clip)
        if region is not None:
            question = question.replace("{region}", region) if "{region}" in question else f"{region} {question}"
        gen = self._generate(question, int(max_tokens), temperature, seed)
        return gen if stream else "".join(gen)

    def ask_text(self, question: str, max_tokens: int = 64) -> str:
        """Answer a question whose regions are already written as text, in either format (evaluation)."""
        return "".join(self._generate(question, max_tokens, 0.0, 0))

    def reset(self) -> None:
        """Forget the conversation (the image stays encoded and its KV prefix kept)."""
        self.turns.clear()
        self._first_kept = self._kv_turns = 0
        if self._slot is not None and self._prefix_len:
            self.engine.llm.seq_rm(self._slot, self._prefix_len, -1)
        self._len = self._prefix_len

    def close(self) -> None:
        self.engine._release(self)
        self._prefix_len = self._len = self._kv_turns = 0

    # -- internals ---------------------------------------------------------------------------------------
    def _render(self, question: str, first: bool) -> tuple[list, list]:
        """The text of `question` after the prefix, as (parts, boxes): parts are token lists and ints (the row
        of the question's region embeddings that goes there); `first`: the first question after the image
        (inside the image's user message) rather than a later turn of a chat."""
        eng = self.engine
        q = eng.referring.convert(question.replace(referring.IMAGE_TOKEN, "").strip())  # the bundle's format
        boxes = eng.referring.boxes(q) if eng.region_token else []
        if first or not eng.prompt.turn:
            render = eng.prompt.followup
        else:
            render = lambda x: eng.prompt.turn.format(question=x)  # noqa: E731
        text = referring.with_region_tokens(q, render, eng.region_placement, eng.referring.bins) if eng.region_token else render(q)
        pieces = text.split(referring.REGION_TOKEN) if eng.region_token else [text]
        parts: list = []
        for i, piece in enumerate(pieces):
            if piece:
                parts.append(eng.llm.tokenize(piece))
            if i < len(pieces) - 1:
                parts.append(i)
        return parts, boxes

    @staticmethod
    def _size(parts: list) -> int:
        return sum(1 if isinstance(p, int) else len(p) for p in parts)

    def _segments(self, parts: list, boxes: list, clock: _NativeClock) -> list:
        """Parts -> token lists and region-embedding rows `[1, d]` (the region graph runs once per question)."""
        if not any(isinstance(p, int) for p in parts):
            return parts
        emb = clock(self.engine.region, self._embeds, np.asarray(boxes, dtype=np.float32), self.pixels,
                    self.original)
        return [emb[p:p + 1] if isinstance(p, int) else p for p in parts]

    def _turn_size(self, turn: Turn, first: bool) -> int:
        """KV positions of a turn in the cache: its question rendered as the first or a later one, its answer."""
        if first not in turn._sizes:
            turn._sizes[first] = self._size(self._render(turn.question, first)[0])
        return turn._sizes[first] + len(self._answer_tokens(turn))

    def _answer_tokens(self, turn: Turn) -> list[int]:
        if not turn.tokens:  # a turn given as text
            turn.tokens = self.engine.llm.tokenize(turn.answer) + list(self.engine._close_tokens)
        return turn.tokens

    def _prefill(self, segs: list, slot: int, pos: int, clock: _NativeClock, logits_last: bool) -> int:
        """Decode segments in order (adjacent token lists in one call); returns the next position."""
        llm = self.engine.llm
        merged: list = []
        for seg in segs:
            if isinstance(seg, list) and merged and isinstance(merged[-1], list):
                merged[-1] = merged[-1] + seg
            elif len(seg):
                merged.append(list(seg) if isinstance(seg, list) else seg)
        for i, seg in enumerate(merged):
            last = logits_last and i == len(merged) - 1
            fn = llm.decode_embeddings if isinstance(seg, np.ndarray) else llm.decode_tokens
            pos = clock(fn, seg, slot, pos, logits_last=last)
            self._len = pos
        return pos

    def _plan_history(self, n_first: int, n_turn: int, max_tokens: int, t: "Timings") -> None:
        """History mode: drop the oldest turns in context when the question (`n_turn` tokens after turns,
        `n_first` as the first question) and its answer budget do not fit after them."""
        n_ctx, prefix = self.engine.llm.n_ctx, self._prefix_len_for()
        keep = self.context_turns
        reserve = max(0, min(max_tokens, n_ctx - prefix - n_first))
        sizes = [self._turn_size(turn, first=i == 0) for i, turn in enumerate(keep)]
        if prefix + sum(sizes) + n_turn + reserve <= n_ctx:
            return
        room = n_ctx - prefix - n_turn - reserve
        drop = 1
        while drop < len(keep):  # the first kept turn becomes the first question: sized as such
            if self._turn_size(keep[drop], first=True) + sum(sizes[drop + 1:]) <= room // 2:
                break
            drop += 1
        self._first_kept += drop
        self._kv_turns = -1  # the kept turns go into the cache again, after the prefix
        t.turns_dropped = drop

    def _prefix_len_for(self) -> int:
        return len(self.engine._head_tokens) + (self._embeds.shape[0] if self._embeds is not None
                                                 else self.engine.n_image_tokens)

    def _generate(self, question: str, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        eng, llm = self.engine, self.engine.llm
        if self._busy:
            raise InputError("this session is still answering its previous question")
        t0 = time.perf_counter()
        t = Timings()
        clock = _NativeClock()  # time inside llama.cpp / onnxruntime
        paused = 0.0  # time the consumer held the generator at a `yield`
        self._busy = True
        slot, start, done = None, None, False
        try:
            slot = eng._acquire(self)
            n0 = time.perf_counter()
            if self._embeds is None:
                self._embeds, t.image_cached, t.vision_ms = eng.image_embeddings(self.pixels)
                clock.seconds += t.vision_ms / 1e3
            prefix_len = self._prefix_len_for()
            parts, boxes = self._render(question, first=True)
            n_first = self._size(parts)
            if prefix_len + n_first > llm.n_ctx:
                raise InputError(f"the question needs {prefix_len + n_first} context positions ({n_first} prompt "
                                 f"tokens after the {prefix_len}-position [system + image] prefix); the context "
                                 f"holds {llm.n_ctx}")
            if self.context_turns:  # history mode, a later turn of the chat
                later, _ = self._render(question, first=False)
                self._plan_history(n_first, self._size(later), max_tokens, t)
                if self.context_turns:
                    parts = later
            n_new = self._size(parts)
            keep = self.context_turns
            hist = sum(self._turn_size(turn, first=i == 0) for i, turn in enumerate(keep))
            reserve = max(0, min(max_tokens, llm.n_ctx - prefix_len - hist - n_new))
            limit = eng._make_room(self, prefix_len + hist + n_new + reserve)
            if prefix_len + hist + n_new > limit:  # only while other sessions are in the middle of answers
                raise InputError(f"the question needs {prefix_len + hist + n_new} context positions and "
                                 f"{limit} of {llm.n_ctx} are free: other sessions are answering")
            # the cache: [system + image], then (history) the turns in context, then this question
            if self._prefix_len != prefix_len or self._len < prefix_len:
                clock(llm.seq_rm, slot, 0, -1)
                self._len = self._kv_turns = 0
                self._prefix_len = self._prefill([list(eng._head_tokens), self._embeds], slot, 0, clock, False)
                t.n_prompt += self._prefix_len
            elif self._kv_turns != len(keep) or not keep:
                if self._len > prefix_len:
                    clock(llm.seq_rm, slot, prefix_len, -1)  # drop what follows the prefix, keep the image
                self._len, self._kv_turns = prefix_len, 0
            if self._kv_turns != len(keep):
                segs: list = []
                for i, turn in enumerate(keep):
                    turn_parts, turn_boxes = self._render(turn.question, first=i == 0)
                    segs += self._segments(turn_parts, turn_boxes, clock) + [self._answer_tokens(turn)]
                before = self._len
                self._prefill(segs, slot, self._len, clock, False)
                t.n_prompt += self._len - before
                self._kv_turns = len(keep)
            start = self._len
            pos = self._prefill(self._segments(parts, boxes, clock), slot, start, clock, True)
            t.n_prompt += n_new
            rng = np.random.default_rng(seed)
            tok = clock(llm.sample, temperature, rng)
            t.prefill_ms = (time.perf_counter() - n0) * 1e3 - t.vision_ms
            t.ttft_ms = (time.perf_counter() - t0) * 1e3
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back a character split across tokens
            text = ""
            emitted = 0
            answer: list[int] = []  # the answer's tokens in the cache
            t_dec = time.perf_counter()
            reason = "max_tokens"
            for step in range(max_tokens):
                if clock(llm.is_eog, tok):
                    reason = "eog"
                    break
                text += utf8.decode(clock(llm.piece, tok))
                t.n_generated += 1
                cut = _stop_at(text, eng.stop)
                if cut is not None:
                    text = text[:cut]
                    reason = "stop"
                    break
                safe = len(text) - _stop_prefix_len(text, eng.stop)  # a tail that may begin a stop string waits
                if safe > emitted:
                    y = time.perf_counter()
                    yield text[emitted:safe]
                    paused += time.perf_counter() - y
                    emitted = safe
                if step == max_tokens - 1:
                    break  # the last token's successor is not needed
                if pos >= llm.n_ctx - eng.cells_used(but=self):
                    reason = "context"  # no KV cell left for this token
                    break
                pos = clock(llm.decode_tokens, [tok], slot, pos)
                self._len = pos
                answer.append(tok)
                tok = clock(llm.sample, temperature, rng)
                t.n_decoded += 1
            if reason != "stop" or _stop_at(text, eng.stop) is None:
                text += utf8.decode(b"", final=True)
            if len(text) > emitted:
                y = time.perf_counter()
                yield text[emitted:]
                paused += time.perf_counter() - y
            t.decode_ms = (time.perf_counter() - t_dec - paused) * 1e3
            t.stop_reason = reason
            if self.history:  # the answer's last token and the closing of the turn belong to the conversation
                tail = {"eog": [tok], "stop": [tok], "max_tokens": [tok] + eng._close_tokens}.get(reason, [])
                tail = tail[:max(0, llm.n_ctx - eng.cells_used(but=self) - pos)]
                if tail:
                    pos = self._prefill([tail], slot, pos, clock, False)
                answer += tail
            self.turns.append(Turn(question, text, answer, reason))
            if self.history:
                self._kv_turns = len(self.context_turns)
            else:
                self._first_kept = len(self.turns)
            t.n_context = self._len
            t.overhead_ms = (time.perf_counter() - t0 - paused - clock.seconds) * 1e3
            self.timings = t
            done = True
        finally:
            if not done and start is not None and self._slot == slot and self._len > start:
                llm.seq_rm(slot, start, -1)  # an answer not finished (an error, a consumer that stopped reading)
                self._len = start
            self._busy = False


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
