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

The multimodal matrix (`collect_imatrix`) counts them: the torch checkpoint's own forward pass over the same
conversations with their images and regions, every `nn.Linear` of the LLM adding its input's squared columns,
written in llama.cpp's GGUF imatrix format (`write_imatrix`) for the same `llama-quantize --imatrix`.

    info = compute_imatrix(gguf_f16, out_path, manifest, data=Path("sw10k"), records=600)   # text
    info = collect_imatrix(checkpoint, out_path, manifest, data=Path("sw10k"), records=600)  # images + regions
    quantize_with_imatrix(gguf_f16, out_gguf, "Q4_K_M", out_path)

llama_model_quantize's imatrix argument cannot be filled from Python (llama-cpp-python 0.3.36 passes the
`imatrix` field as an opaque pointer to a C++ map), hence the tools (`make native`).
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from chatspot_edge.errors import InputError

IMATRIX_SOURCES = ("text", "multimodal")  # llama-imatrix on text / the torch forward pass with images (collect_imatrix)
IMATRIX_SUFFIX = "-imatrix"  # variant name: "Q4_K_M-imatrix" (file llm-q4_k_m-imatrix.gguf)
DEFAULT_RECORDS = 600
CHUNK_TOKENS = 512
Log = Callable[[str], None]


def _records(data: Path | None, n: int, seed: int) -> tuple[list[dict], Callable[[dict], Any], str]:
    """(records, image loader, description): `n` shuffled train records of `data`, or generated in memory."""
    if data is not None:
        from chatspot_edge.data import load_image, load_split

        records = load_split(data, "train")
        if not records:
            raise InputError(f"{data}: no train records for the importance matrix")
        load, desc = (lambda r: load_image(data, r)), f"{data} (train split)"
    else:
        from chatspot_edge.data.spotworld import make_sample

        samples = [make_sample(seed, "train", i) for i in range(n)]
        images = {s.record["id"]: s.image for s in samples}
        records = [s.record for s in samples]
        load, desc = (lambda r: images[r["id"]]), f"SpotWorld train split generated in memory (seed {seed})"
    random.Random(seed).shuffle(records)  # mix the tasks: chunks of 512 tokens hold ~7 conversations
    return records[:n], load, desc


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
    recs, _, desc = _records(data, records, seed)
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


# -- the multimodal importance matrix: the model's own forward pass on images, regions and text ----------------

def _train_examples(manifest: dict, processor, data: Path | None, n: int, seed: int) -> tuple[list, str]:
    """`quantize.kl.Example`s of `n` shuffled train conversations (all their turns), images resized as the
    bundle resizes them."""
    from chatspot_edge.quantize.kl import build_examples

    recs, load, desc = _records(data, n, seed)
    size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
    examples = build_examples(recs, load, processor, size, manifest["image"].get("resize", "bicubic"), turns=None)
    return examples, desc


def write_imatrix(out: Path, stats: dict[str, tuple["np.ndarray", int]], dataset: str, chunk_count: int,
                  chunk_size: int) -> None:
    """An importance matrix in llama.cpp's GGUF imatrix format (what `llama-imatrix --output-format gguf` writes
    and `llama-quantize --imatrix` reads): per weight `NAME.in_sum2` (F32, the sum over calibration rows of each
    input column's squared activation) and `NAME.counts` (F32, the number of rows), plus `imatrix.*` metadata."""
    import gguf
    import numpy as np

    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
    w.add_type("imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(stats):
        sums, rows = stats[name]
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.full((1, 1), float(rows), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)


def collect_imatrix(checkpoint: Path, out: Path, manifest: dict, data: Path | None = None,
                    records: int = DEFAULT_RECORDS, threads: int = 2, seed: int = 0,
                    log: Log = print) -> dict[str, Any]:
    """Write the importance matrix of the checkpoint's LLM, measured on what the bundle's LLM is fed: the
    torch model's forward pass over `records` SpotWorld train conversations (all turns) with their images and
    regions, so the image and region positions (projector and region-encoder outputs, about half of a
    first-turn prompt) are counted like the text ones. Every `nn.Linear` of the LLM adds its input's squared
    columns; the tied output head is recorded as `token_embd.weight` (the matrix llama.cpp multiplies by).
    The GGUF's q/k rows are permuted for llama.cpp's rope layout, which leaves input columns (what an imatrix
    weights) unchanged."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _collect(checkpoint, out, manifest, data, records, seed, log)
    finally:
        torch.set_num_threads(threads_before)


def _collect(checkpoint: Path, out: Path, manifest: dict, data: Path | None, records: int, seed: int,
             log: Log) -> dict[str, Any]:
    import torch

    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.model.llama_gguf import gguf_name, hf_to_gguf_names
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.quantize.kl import torch_inputs

    model, tok = load_checkpoint(checkpoint)
    examples, desc = _train_examples(manifest, Processor(tok, model.config), data, records, seed)
    if not examples:
        raise InputError(f"no calibration conversations for the importance matrix ({desc})")
    llm = model.llm
    tmap = hf_to_gguf_names(llm.config.num_hidden_layers)
    tied = bool(llm.config.tie_word_embeddings)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return record

    handles = []
    for hf, mod in llm.named_modules():
        if isinstance(mod, torch.nn.Linear):
            head = "token_embd.weight" if tied else "output.weight"
            name = head if hf == "lm_head" else gguf_name(tmap, hf + ".weight")
            handles.append(mod.register_forward_pre_hook(hook(name)))
    log(f"imatrix: {len(examples)} conversations of {desc} with their images and regions, through {checkpoint}")
    t0, tokens = time.perf_counter(), 0
    try:
        with torch.no_grad():
            for i, ex in enumerate(examples):
                hidden = llm.model(inputs_embeds=torch_inputs(model, ex)).last_hidden_state
                llm.lm_head(hidden)
                tokens += len(ex.ids)
                if (i + 1) % 100 == 0:
                    log(f"imatrix: {i + 1}/{len(examples)} conversations, {time.perf_counter() - t0:.0f} s")
    finally:
        for h in handles:
            h.remove()
    chunks = max(1, -(-tokens // CHUNK_TOKENS))
    write_imatrix(out, {k: (sums[k].float().numpy(), rows[k]) for k in sums}, f"{desc}; images and regions",
                  chunks, CHUNK_TOKENS)
    seconds = time.perf_counter() - t0
    log(f"imatrix: {tokens:,} positions ({len(sums)} matrices) in {seconds:.0f} s -> {out.name}")
    return {"calibration": desc, "records": len(examples), "tokens": tokens, "source": str(checkpoint),
            "seconds": round(seconds, 1), "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "image_embeddings": "included: the checkpoint's forward pass with each conversation's image and regions"}


def quantize_with_imatrix(src: Path, dst: Path, quant: str, imatrix_file: Path, threads: int = 2,
                          overrides: Sequence[tuple[str, str]] = ()) -> None:
    """llama-quantize `src` -> `dst` as `quant` (e.g. "Q4_K_M") weighted by `imatrix_file`; `overrides`:
    (pattern, type) pairs passed as `--tensor-type pattern=type`."""
    from chatspot_edge.llama_tools import quantize

    quantize(src, dst, quant, imatrix=imatrix_file, threads=threads, tensor_types=overrides)
    if not dst.is_file():
        raise RuntimeError(f"llama-quantize wrote no {dst}")
