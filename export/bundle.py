"""Checkpoint -> bundle (SPEC section 3): GGUF LLM + ONNX vision (+ region graph) (+ Core ML) + manifest.

Everything is written into a temporary sibling folder that replaces `out` only when complete
(`chatspot_edge.files.atomic_dir`), so an interrupted or failed export leaves no bundle behind.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from chatspot_edge.errors import InputError
from chatspot_edge.files import atomic_dir, file_sha256
from chatspot_edge.referring import REGION_TOKEN

from chatspot_edge.export.gguf_writer import LLM_DTYPES, chatml_template, vicuna_template, write_llm_gguf
from chatspot_edge.export.manifest import FORMAT, MANIFEST, default_n_ctx, tool_versions, write_manifest
from chatspot_edge.export.onnx_vision import export_region_onnx, export_vision_onnx

VISION_FILE = "vision.onnx"
REGION_FILE = "region.onnx"
COREML_FILE = "vision.mlpackage"
RESIZE = "bicubic"
DEFAULT_N_CTX = 2048


def llm_file_name(quant: str) -> str:
    return f"llm-{quant.lower()}.gguf"


def _chat_template(cfg) -> str | None:
    """A Jinja chat template equal to the checkpoint's prompt format (None: keep the tokenizer's own)."""
    if "<|im_start|>" in cfg.prompt_template:
        return chatml_template(cfg.system_prompt)
    if " USER: " in cfg.prompt_template and "ASSISTANT:" in cfg.prompt_template:
        return vicuna_template(cfg.system_prompt)
    return None


def _source_hashes(ckpt: Path) -> dict[str, Any]:
    weights = sorted(ckpt.glob("*.safetensors"))
    out: dict[str, Any] = {"checkpoint": str(ckpt.resolve())}
    if (ckpt / "model.safetensors").is_file():
        out["checkpoint_sha256"] = file_sha256(ckpt / "model.safetensors")
    if weights and [w.name for w in weights] != ["model.safetensors"]:
        out["checkpoint_files_sha256"] = {w.name: file_sha256(w) for w in weights}
    if (ckpt / "config.json").is_file():
        out["config_sha256"] = file_sha256(ckpt / "config.json")
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise InputError(f"{out}: exists and is not a bundle (refusing to replace it)")


def build_manifest(model, tokenizer, ckpt: Path, llm_info: dict, llm_file: str, vision_io: dict,
                   region_io: dict | None, coreml_entry: dict | None, n_ctx: int, seconds: float) -> dict[str, Any]:
    from chatspot_edge.model.processor import Processor

    cfg = model.config
    proc = Processor(tokenizer, cfg)
    h, w = cfg.vision.image_size
    text = model.llm.config
    vision: dict[str, Any] = {"file": VISION_FILE, "precision": "fp32", **vision_io}
    if coreml_entry is not None:
        vision["coreml"] = {"file": COREML_FILE, **coreml_entry}
    fmt = cfg.referring_format
    referring: dict[str, Any] = {**fmt.to_dict(), "region_token": bool(cfg.region_token)}  # format (+ bins)
    if cfg.region_token:
        referring.update(
            graph=REGION_FILE, inputs=region_io["inputs"], outputs=region_io["outputs"], placeholder=REGION_TOKEN,
            placeholder_id=int(cfg.region_token_id), opset=region_io["opset"], placement=cfg.region_placement,
            usage=("one `<region>` per region of the question, placed per `placement` (after each `</box>`, or "
                   "all at the end of the prompt just before the answer); run the graph once per question, on the "
                   "image's image_embeds, ALL the question's regions' normalized boxes in order and the image, and "
                   "feed row r as the embedding of the r-th `<region>` (a row may depend on the question's other "
                   "regions: models with relative geometry place each region relative to the first)"),
        )
        if cfg.region_crop == "original":
            from chatspot_edge.model import preprocess as pp

            ch, cw = cfg.region_crop_size
            referring["crop"] = {
                "source": "original image", "height": ch, "width": cw, "channels": "R, G, B, validity",
                "function": "chatspot_edge.model.preprocess.region_crops",
                "rule": (f"each region's normalized box read from the ORIGINAL image (its longer side first "
                         f"capped at {pp.REGION_SOURCE_MAX} px), scaled by one factor (aspect kept, antialiased "
                         f"bilinear) to fill {ch} px of height or {cw} px of width, whichever binds first, "
                         f"centred on the {ch} x {cw} canvas; validity 255 inside, 0 in padding (RGB 0); a point is "
                         f"a square of {pp.POINT_SIDE:.4f} x the shorter image side around it"),
            }
    extra_tools = ("coremltools",) if coreml_entry is not None else ()
    return {
        "format": FORMAT,
        "model": {
            "name": ckpt.resolve().name,
            "preset": cfg.preset,
            "architecture": "vision encoder + projector + llama LLM (LLaVA-style), ChatSpot referring",
            "vision_encoder": cfg.vision.kind,
            "parameters": model.num_parameters(),
            "llm": {"n_layer": int(text.num_hidden_layers), "n_head": int(text.num_attention_heads),
                    "n_head_kv": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
                    "n_vocab": llm_info["n_vocab"], "n_ctx_train": llm_info["n_ctx_train"],
                    "tied_embeddings": bool(getattr(text, "tie_word_embeddings", False))},
            "provenance": {
                **_source_hashes(ckpt),
                "training": cfg.provenance,
                "tools": tool_versions(extra_tools),
                "exported_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "export_seconds": round(seconds, 2),
            },
        },
        "image": {"height": int(h), "width": int(w), "resize": RESIZE, "tokens": int(cfg.num_image_tokens)},
        "llm": {"file": llm_file, "quant": llm_info["quant"], "n_embd": llm_info["n_embd"], "n_ctx": n_ctx},
        "vision": vision,
        "prompt": proc.prompt.manifest(),
        "referring": referring,
        "special_tokens": {
            "image": int(cfg.image_token_id), "box_start": int(cfg.box_start_id), "box_end": int(cfg.box_end_id),
            "region": int(cfg.region_token_id) if cfg.region_token_id is not None else -1,
            "bos": _id(tokenizer.bos_token_id), "eos": _id(cfg.eos_token_id), "pad": _id(cfg.pad_token_id),
            "stop": [int(i) for i in proc.stop_ids],
            **({"loc_0": int(cfg.referring["loc_token_id"])} if fmt.is_loc else {}),  # <loc_k> is loc_0 + k
        },
    }


def _id(v) -> int:
    return -1 if v is None else int(v)


def export_bundle(ckpt: str | Path, out: str | Path, coreml: bool = False, llm_dtype: str = "f16",
                  n_ctx: int | None = None) -> Path:
    """Export checkpoint `ckpt` (ours or a Hugging Face LLaVA folder) to the bundle folder `out`.

    llm_dtype: "f32", "f16" or "bf16" for the GGUF's 2-D weights; n_ctx: the manifest's context size
    (default min(2048, the LLM's max positions)). Returns `out`. Raises InputError on bad input."""
    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.progress import task_progress

    ckpt, out = Path(ckpt), Path(out)
    llm_dtype = llm_dtype.lower()
    if llm_dtype not in LLM_DTYPES:
        raise InputError(f"--llm-dtype {llm_dtype!r}: choose from {', '.join(LLM_DTYPES)}")
    if not ckpt.is_dir():
        raise InputError(f"{ckpt}: not a checkpoint folder")
    _check_out(out)
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(ckpt)
    model = model.float().eval()
    cfg = model.config
    max_pos = int(model.llm.config.max_position_embeddings)
    n_ctx = default_n_ctx(max_pos, DEFAULT_N_CTX) if n_ctx is None else int(n_ctx)
    if not 0 < n_ctx <= max_pos:
        raise InputError(f"n_ctx {n_ctx} must be in 1..{max_pos}")
    steps = 3 + bool(cfg.region_token) + bool(coreml)
    with task_progress(f"export {out.name}") as update, atomic_dir(out) as tmp:
        done = 0
        update(done, steps)
        quant = LLM_DTYPES[llm_dtype][2]
        llm_file = llm_file_name(quant)
        llm_info = write_llm_gguf(model.llm, tokenizer, tmp / llm_file, llm_dtype, name=ckpt.resolve().name,
                                  chat_template=_chat_template(cfg))
        done += 1
        update(done, steps)
        vision_io = export_vision_onnx(model, tmp / VISION_FILE)
        done += 1
        update(done, steps)
        region_io = None
        if cfg.region_token:
            region_io = export_region_onnx(model, tmp / REGION_FILE)
            done += 1
            update(done, steps)
        coreml_entry = None
        if coreml:
            from chatspot_edge.export.coreml_vision import export_vision_coreml

            coreml_entry = export_vision_coreml(model, tmp / COREML_FILE)
            done += 1
            update(done, steps)
        manifest = build_manifest(model, tokenizer, ckpt, llm_info, llm_file, vision_io, region_io, coreml_entry,
                                  n_ctx, time.perf_counter() - t0)
        write_manifest(tmp, manifest)
        done += 1
        update(done, steps)
    return out
