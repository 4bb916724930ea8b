"""Importance-matrix (imatrix) quantization: llama.cpp's llama-imatrix and llama-quantize on referring data.

An importance matrix holds, for every weight matrix of the LLM, the mean square of each input column's activation
over calibration text; llama-quantize then chooses each block's scales (and, for k-quants and IQ4_NL, the rounding)
to minimise the error weighted by it, so the columns the model actually drives hard are kept most exactly.

Calibration text: SpotWorld conversations (the train split, never test) rendered in the bundle's own chat template
(system prompt, question with its `<box>[...]</box>` region, answer, turn end), exactly the text the model sees,
parsed with special tokens (`<|im_start|>`, `<box>`, ...) as single ids. What it leaves out: the image and region
embeddings. llama-imatrix reads text only, and the `<image>` / `<region>` placeholders would feed rows of the
token-embedding table the runtime never uses, so they are dropped: the activations of the 49 image positions and
the region positions (about half of a cold prompt) do not reach the matrix. They enter layer 0 as projector
outputs, not token embeddings, so their statistics differ there most; from the first block on, every position goes
through the same weights and the text positions already cover those matrices (docs/build.md measures the result).

    info = compute_imatrix(gguf_f16, out_path, data=Path("sw10k"), records=600)
    quantize_with_imatrix(gguf_f16, out_gguf, "Q4_K_M", out_path)

llama_model_quantize's imatrix argument cannot be filled from Python (llama-cpp-python 0.3.36 passes the
`imatrix` field as an opaque pointer to a C++ map), hence the tools (`make native`).
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any, Callable

from chatspot_edge.errors import InputError

IMATRIX_SUFFIX = "-imatrix"  # variant name: "Q4_K_M-imatrix" (file llm-q4_k_m-imatrix.gguf)
DEFAULT_RECORDS = 600
CHUNK_TOKENS = 512
Log = Callable[[str], None]


def _records(data: Path | None, n: int, seed: int) -> tuple[list[dict], str]:
    if data is not None:
        from chatspot_edge.data import load_split

        records = load_split(data, "train")
        if not records:
            raise InputError(f"{data}: no train records for the importance matrix")
        desc = f"{data} (train split)"
    else:
        from chatspot_edge.data.spotworld import make_sample

        records = [make_sample(seed, "train", i).record for i in range(n)]
        desc = f"SpotWorld train split generated in memory (seed {seed})"
    random.Random(seed).shuffle(records)  # mix the tasks: chunks of 512 tokens hold ~7 conversations
    return records[:n], desc


def conversation_text(prompt: dict, conversations: list[dict], referring: dict | None = None) -> str:
    """One conversation in the bundle's chat template (manifest `prompt`): the first question through
    `template`, later ones through `turn`, each answer followed by the first stop string. `{image}` is left
    empty and `<image>` / `<region>` placeholders are removed (they stand for embeddings, not text). Regions are
    written in the bundle's referring format (manifest `referring`: chatspot-loc-v1 bundles read loc tokens)."""
    from chatspot_edge.model.prompt import strip_image_token
    from chatspot_edge.referring import IMAGE_TOKEN, ReferringFormat

    fmt = ReferringFormat.from_dict(referring)

    stop = (prompt.get("stop") or [""])[0]
    turn = prompt.get("turn") or prompt["template"]
    parts: list[str] = []
    for i in range(0, len(conversations) - 1, 2):
        q, a = conversations[i], conversations[i + 1]
        if q.get("from") != "human" or a.get("from") != "gpt":
            break
        question = fmt.convert(strip_image_token(q["value"]).replace("<region>", "").replace(IMAGE_TOKEN, ""))
        head = (prompt["template"].format(system=prompt["system"], image="", question=question) if i == 0
                else turn.format(question=question))
        parts.append(head + fmt.convert(a["value"]) + stop)
    return "".join(parts)


def calibration_text(manifest: dict, data: Path | None, records: int = DEFAULT_RECORDS, seed: int = 0) -> tuple[str, str]:
    """(text, description) of `records` SpotWorld train conversations in the bundle's chat template."""
    recs, desc = _records(data, records, seed)
    texts = [conversation_text(manifest["prompt"], r["conversations"], manifest.get("referring")) for r in recs]
    return "\n".join(t for t in texts if t) + "\n", f"{len([t for t in texts if t])} conversations of {desc}"


def compute_imatrix(gguf: Path, out: Path, manifest: dict, data: Path | None = None, records: int = DEFAULT_RECORDS,
                    threads: int = 2, seed: int = 0, log: Log = print) -> dict[str, Any]:
    """Write the importance matrix of `gguf` (the bundle's full-precision LLM) on referring calibration text to
    `out` (GGUF imatrix format); returns what it was computed on."""
    from chatspot_edge.llama_tools import imatrix

    text, desc = calibration_text(manifest, data, records, seed)
    text_file = out.with_suffix(".calibration.txt")
    text_file.write_text(text)
    log(f"imatrix: {desc}, {len(text):,} characters, chunks of {CHUNK_TOKENS} tokens, {gguf.name}")
    t0 = time.perf_counter()
    try:
        stderr = imatrix(gguf, text_file, out, n_ctx=CHUNK_TOKENS, threads=threads)
    finally:
        text_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    chunks = next((int(line.split("computing over")[1].split()[0]) for line in stderr.splitlines()
                   if "computing over" in line), None)  # "compute_imatrix: computing over 5 chunks, n_ctx=512, ..."
    log(f"imatrix: {chunks} chunks in {seconds:.0f} s -> {out.name}")
    return {"calibration": desc, "records": records, "chunk_tokens": CHUNK_TOKENS, "chunks": chunks,
            "tokens": chunks * CHUNK_TOKENS if chunks else None, "source": gguf.name, "seconds": round(seconds, 1),
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "image_embeddings": "not seen: llama-imatrix reads text only; <image> / <region> placeholders dropped"}


def quantize_with_imatrix(src: Path, dst: Path, quant: str, imatrix_file: Path, threads: int = 2) -> None:
    """llama-quantize `src` -> `dst` as `quant` (e.g. "Q4_K_M") weighted by `imatrix_file`."""
    from chatspot_edge.llama_tools import quantize

    quantize(src, dst, quant, imatrix=imatrix_file, threads=threads)
    if not dst.is_file():
        raise RuntimeError(f"llama-quantize wrote no {dst}")
