"""`chatspot-edge`: the command line of SPEC section 4.

Each command is a thin shell over its stage's module (imported lazily, so `--help` is instant). A bad input
(`InputError`) prints one line to stderr and exits 2; nothing is left half-written (every writer is atomic).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from chatspot_edge.errors import InputError
from chatspot_edge.openmp import share_cores_with_torch

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ChatSpot Edge: train, export, quantize and run a referring multimodal LLM offline.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets.")
app.add_typer(data_app, name="data")


@data_app.command("spotworld")
def data_spotworld(
    out: Path = typer.Option(..., help="output folder"),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(10000, "--n-train"),
    n_test: int = typer.Option(1000, "--n-test"),
    workers: Optional[int] = typer.Option(None, help="parallel processes (default: all cores)"),
) -> None:
    """Write the synthetic SpotWorld referring dataset (SPEC section 5)."""
    from chatspot_edge.data import generate
    from chatspot_edge.progress import task_progress

    with task_progress("spotworld") as progress:
        meta = generate(out, seed=seed, n_train=n_train, n_test=n_test, workers=workers, progress=progress)
    typer.echo(f"wrote {out}: {meta.get('n_train', n_train)} train, {meta.get('n_test', n_test)} test samples")


@app.command()
def adapt(
    preset: str = typer.Option(..., help="mini or smol"),
    data: Path = typer.Option(..., help="SpotWorld (or any LLaVA-style JSONL) folder"),
    out: Path = typer.Option(..., help="output checkpoint folder"),
    minutes: Optional[float] = typer.Option(None, help="time budget for stage 2 (default: the preset's)"),
    steps: Optional[int] = typer.Option(None, help="stage-2 optimizer steps (overrides --minutes)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    stage1_steps: Optional[int] = typer.Option(None, "--stage1-steps"),
    reader_steps: Optional[int] = typer.Option(None, "--reader-steps", help="stage 0: steps of reader pre-training "
                                               "of the region crop view on the reading questions (default: the "
                                               "preset's; 0: none)"),
    eval_every: int = typer.Option(0, "--eval-every", help="evaluate on a test slice every K steps (0: off)"),
    eval_samples: int = typer.Option(200, "--eval-samples", help="test records in each periodic evaluation"),
    save_every: int = typer.Option(100, "--save-every", help="write a resumable checkpoint every K steps"),
    resume: bool = typer.Option(False, help="continue from OUT/resume if present"),
    lora: bool = typer.Option(False, help="stage 2 with LoRA adapters (peft) instead of a full fine-tune"),
    fsdp: bool = typer.Option(False, help="under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                                          "instead of DDP, for models that do not fit one device"),
    seed: int = typer.Option(0),
    vision_pool: int = typer.Option(2, "--vision-pool", help="2: 7x7 = 49 image tokens, 1: 14x14 = 196"),
    region_token: bool = typer.Option(True, "--region-token/--no-region-token"),
    blocks: Optional[str] = typer.Option(None, help="mini: SmolLM2 blocks to keep, e.g. 0,6,12,18,24,29"),
    lr_llm: Optional[float] = typer.Option(None, "--lr-llm", help="learning rate of the LLM blocks"),
    lr_embed: Optional[float] = typer.Option(None, "--lr-embed", help="learning rate of the token embeddings"),
    lr_proj: Optional[float] = typer.Option(None, "--lr-proj", help="learning rate of the projector and the "
                                            "region encoder"),
    region_align: float = typer.Option(1.0, "--region-align", help="weight of the region-text alignment loss"),
    region_align_kind: Optional[str] = typer.Option(None, "--region-align-kind",
                                                    help="region-text alignment: absolute, contrastive (which "
                                                         "region says each answer token) or both; default: the "
                                                         "preset's"),
    cell_align: Optional[float] = typer.Option(None, "--cell-align", help="weight of the image-cell / word "
                                               "alignment loss (which cells show each colour / shape word of the "
                                               "records' objects; 0: off; default: the preset's)"),
    relation_align: Optional[float] = typer.Option(None, "--relation-align",
                                                   help="weight of the relation-word alignment: the relative "
                                                        "view's word choice learns the relation words the "
                                                        "questions and answers use (train.relation_align; needs "
                                                        "--relation-words; default: 1 for a model with relation words, else 0)"),
    ground_attn: Optional[float] = typer.Option(None, "--ground-attn", help="weight of the grounding attention "
                                                "supervision (heads look at the image cells of a box answer's object; "
                                                "loc models; 0: off; default: the preset's)"),
    region_placement: Optional[str] = typer.Option(None, "--region-placement", help="after_box or before_answer"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from this trained checkpoint instead of the "
                                                              "preset (its design and referring format)"),
    warm_start: Optional[Path] = typer.Option(None, "--warm-start",
                                              help="copy projector, region encoder and added-token embeddings "
                                                   "from this checkpoint (same vision encoder and hidden size)"),
    turns: Optional[int] = typer.Option(None, "--turns", help="questions per image per sample, as independent "
                                        "turns on one shared image prefix (0: the conversation as one chat)"),
    embeddings: str = typer.Option("added", "--embeddings", help="token-embedding rows that train in stage 2: "
                                   "added (the added tokens only) or all"),
    precision: str = typer.Option("auto", "--precision", help="bf16, fp32 or auto (bf16 where the hardware "
                                  "multiplies bf16 natively)"),
    position_2d: bool = typer.Option(True, "--position-2d/--no-position-2d", help="2D cell position in the image tokens"),
    region_crop: str = typer.Option("original", "--region-crop", help="region appearance: original (aspect-kept "
                                    "crop of the original image) or resized (16x16 RoI of the square resize)"),
    region_geometry: bool = typer.Option(True, "--region-geometry/--no-region-geometry",
                                         help="box centre / size embedding in each region embedding"),
    region_relative: Optional[bool] = typer.Option(None, "--region-relative/--no-region-relative",
                                                   help="each region's offset, edge gaps and size ratios to its "
                                                        "question's first region in its embedding (default: the "
                                                        "preset's; with --init: adds the view to the checkpoint)"),
    relation_words: Optional[bool] = typer.Option(None, "--relation-words/--no-relation-words",
                                                  help="the relative view also writes the LLM's embedding of the "
                                                       "relation word (left, right, above, below, larger, smaller) "
                                                       "between the question's first region and each other one "
                                                       "(default: the preset's; with --init: adds it)"),
    relation_groups: Optional[bool] = typer.Option(None, "--relation-groups/--no-relation-groups",
                                                   help="a position word and a size word from a choice each (else "
                                                        "one choice over all six; default: the preset's)"),
    relation_gain: Optional[float] = typer.Option(None, "--relation-gain",
                                                  help="the relation words' initial share of the region "
                                                       "embedding's norm (learned; 0: the LLM's rows as they are, "
                                                       "0.3% of a trained region embedding; default: the preset's "
                                                       "0)"),
    referring: Optional[str] = typer.Option(None, "--referring",
                                            help="referring format: text (chatspot-text-v1, the default) or loc "
                                                 "(chatspot-loc-v1: one <loc_k> token per coordinate)"),
    bins: Optional[int] = typer.Option(None, "--bins", help="loc: bins per axis N (default 32)"),
    loc_init: Optional[str] = typer.Option(None, "--loc-init", help="loc: initial <loc_k> rows: mean (the mean "
                                           "embedding), fourier (smooth in k) or position (the image cells' own 2D "
                                           "position map); default: the preset's"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (default: cpu, or cuda when "
                                                                "CHATSPOT_DEVICE=cuda and a GPU is present)"),
) -> None:
    """Referring-instruction tuning (ChatSpot's two stages): projector alignment, then projector + LLM."""
    share_cores_with_torch()  # as the training's measured budgets were taken (torch's pool waits passively)
    from chatspot_edge.train.adapt import AdaptOptions, adapt as run_adapt

    opts = AdaptOptions(preset=preset, data=data, out=out, minutes=minutes, steps=steps, batch_size=batch_size,
                        grad_accum=grad_accum, stage1_steps=stage1_steps, reader_steps=reader_steps,
                        eval_every=eval_every, eval_samples=eval_samples,
                        save_every=save_every, resume=resume, lora=lora, fsdp=fsdp, seed=seed, vision_pool=vision_pool,
                        region_token=region_token, blocks=blocks, lr_llm=lr_llm, lr_embed=lr_embed, lr_proj=lr_proj,
                        region_align=region_align, region_align_kind=region_align_kind, cell_align=cell_align,
                        ground_attn=ground_attn, relation_align=relation_align,
                        region_placement=region_placement, init=init,
                        warm_start=warm_start, turns=turns, embeddings=embeddings, precision=precision,
                        design=dict(position_2d=position_2d, region_crop=region_crop, region_geometry=region_geometry,
                                    **({} if region_relative is None else {"region_relative": region_relative}),
                                    **({} if relation_words is None else {"relation_words": relation_words}),
                                    **({} if relation_groups is None else {"relation_groups": relation_groups}),
                                    **({} if relation_gain is None else {"relation_gain": relation_gain})),
                        referring=referring, bins=bins, loc_init=loc_init, device=device)
    run_adapt(opts)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="trained checkpoint to prune and distil from"),
    data: Path = typer.Option(..., help="SpotWorld (or any LLaVA-style JSONL) folder: calibration and training"),
    out: Path = typer.Option(..., help="student checkpoint folder (the pruned student, before recovery, goes to "
                                       "OUT.pruned)"),
    keep_blocks: Optional[str] = typer.Option(None, "--keep-blocks", help="N (the N most important blocks) or "
                                                                           "the teacher blocks, e.g. 0,1,2,5,9"),
    ffn_ratio: Optional[float] = typer.Option(None, "--ffn-ratio", help="FFN width kept, a fraction of the "
                                                                        "teacher's (default: the widest that fits)"),
    kv_groups: Optional[int] = typer.Option(None, "--kv-groups", help="GQA groups (key/value heads) kept per block"),
    max_params: float = typer.Option(0.5, "--max-params", help="student / teacher non-embedding LLM parameters"),
    depth_metric: str = typer.Option("loss", "--depth-metric", help="loss (skip-one-block answer loss) or bi "
                                                                    "(ShortGPT block influence)"),
    calib_samples: int = typer.Option(64, "--calib-samples", help="training records the importance is measured on"),
    student: Optional[Path] = typer.Option(None, "--student", help="start from this pruned student instead of "
                                                                   "pruning (e.g. another run's OUT.pruned)"),
    minutes: Optional[float] = typer.Option(None, help="training budget (default: the preset's adapt budget)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (overrides --minutes; 0: prune only)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr_llm: Optional[float] = typer.Option(None, "--lr-llm", help="LLM learning rate (default: the preset's)"),
    lr_proj: Optional[float] = typer.Option(None, "--lr-proj", help="projector + region encoder LR (default: "
                                                                    "--lr-llm)"),
    temperature: float = typer.Option(2.0, help="distillation temperature"),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="weight of KL(teacher || student); 0: CE only"),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="weight of the cross-entropy on the labels"),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="weight of hidden-state matching on kept blocks"),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="folder of the teacher's top-k "
                                                                               "logits (built when missing)"),
    top_k: int = typer.Option(32, "--top-k", help="teacher logits kept per position in the cache"),
    cache_max_mb: float = typer.Option(2048, "--cache-max-mb", help="refuse a cache larger than this"),
    eval_every: int = typer.Option(0, "--eval-every"),
    eval_samples: int = typer.Option(200, "--eval-samples"),
    save_every: int = typer.Option(100, "--save-every"),
    resume: bool = typer.Option(False, help="continue: reuse OUT.pruned, resume training from OUT.train-state"),
    fsdp: bool = typer.Option(False, help="under torchrun: FSDP2 for the student instead of DDP"),
    precision: str = typer.Option("auto", help="bf16, fp32 or auto (bf16 where the hardware multiplies bf16 "
                                               "natively)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or auto (as adapt's --device)"),
    seed: int = typer.Option(0),
) -> None:
    """Prune the teacher's LLM (depth + width, by importance on referring data) into a student at most
    --max-params of its size, then recover it by knowledge distillation (adapt's training loop)."""
    from chatspot_edge.train.distill import DistillOptions, distill as run_distill

    res = run_distill(DistillOptions(
        teacher=teacher, data=data, out=out, student=student, keep_blocks=keep_blocks, ffn_ratio=ffn_ratio,
        kv_groups=kv_groups, max_params=max_params, depth_metric=depth_metric, calib_samples=calib_samples,
        minutes=minutes, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr_llm=lr_llm, lr_proj=lr_proj,
        temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, hidden_weight=hidden_weight,
        teacher_cache=teacher_cache, top_k=top_k, cache_max_mb=cache_max_mb, eval_every=eval_every,
        eval_samples=eval_samples, save_every=save_every, resume=resume, fsdp=fsdp, precision=precision, device=device,
        seed=seed))
    if res.get("prune"):
        s = res["prune"]["summary"]
        typer.echo(f"student: {s['n_layers']} blocks {s['blocks']}, FFN {s['ffn']}, {s['n_head']}/{s['n_head_kv']} "
                   f"heads: {s['non_embedding_params'] / 1e6:.2f} M non-embedding LLM parameters "
                   f"({s['ratio']:.1%} of the teacher's); pruned: {res['pruned']}")
    if res.get("steps"):
        typer.echo(f"wrote {out} ({res['steps']} steps, {res['seconds'] / 60:.1f} min)")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="checkpoint folder or bundle folder"),
    data: Path = typer.Option(...),
    out: Path = typer.Option(..., help="output JSON (SPEC section 6)"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N test records only"),
    batch_size: int = typer.Option(16, "--batch-size"),
    split: str = typer.Option("test"),
    llm: Optional[str] = typer.Option(None, "--llm", help="bundle: LLM variant (e.g. Q4_K_M; default: the manifest's)"),
    vision: Optional[str] = typer.Option(None, "--vision", help="bundle: vision variant (e.g. int8)"),
    device: str = typer.Option("auto", "--device", help="checkpoint: cpu, cuda or auto (CUDA when present); "
                                                        "a bundle always runs on the CPU runtime"),
) -> None:
    """ChatSpot evaluation protocol (SPEC section 6) on a checkpoint or a bundle."""
    if not (model / "manifest.json").is_file():
        share_cores_with_torch()  # a checkpoint runs in torch (a bundle runs in the runtime: no torch)
    from chatspot_edge.evaluation import evaluate_path

    result = evaluate_path(model, data, out, split=split, limit=limit, batch_size=batch_size, llm=llm, vision=vision,
                           device=device)
    for k, v in result["metrics"].items():
        typer.echo(f"{k:>20}: {'-' if v is None else f'{v:.4f}'}")


@app.command()
def export(
    ckpt: Path = typer.Argument(..., help="checkpoint folder (ours or Hugging Face LLaVA)"),
    out: Path = typer.Option(..., help="bundle folder to write"),
    coreml: bool = typer.Option(False, "--coreml", help="also write vision.mlpackage (Core ML, FP16)"),
    llm_dtype: str = typer.Option("f16", "--llm-dtype", help="f32, f16 or bf16"),
) -> None:
    """Checkpoint -> bundle: GGUF LLM + ONNX vision encoder (+ Core ML) + manifest with checksums."""
    share_cores_with_torch()  # torch writes, llama.cpp and onnxruntime check
    from chatspot_edge.export import export_bundle

    export_bundle(ckpt, out, coreml=coreml, llm_dtype=llm_dtype)
    typer.echo(f"wrote {out}")


@app.command()
def quantize(
    bundle: Path = typer.Argument(..., help="bundle folder (variants are added to it in place, atomically)"),
    llm: Optional[str] = typer.Option(None, "--llm", help="LLM types, comma-separated: q8_0,q6_k,q5_k_m,q4_k_m,"
                                      "q4_0,iq4_nl,...; a type may add per-tensor overrides: q4_k_m:ffn_down=q6_k "
                                      "(PATTERN=TYPE, as llama-quantize --tensor-type)"),
    vision: Optional[str] = typer.Option(None, "--vision", help="vision precisions, comma-separated: fp16,int8"),
    coreml: bool = typer.Option(False, "--coreml", help="also Core ML int8 / 6-bit / 4-bit palettized vision packages"),
    force: bool = typer.Option(False, "--force", help="rebuild variants that are already in the bundle"),
    int8_method: str = typer.Option("auto", "--int8-method", help="auto (measure both, keep the better), static or dynamic"),
    calib: int = typer.Option(32, "--calib", help="calibration images for static int8"),
    threads: Optional[int] = typer.Option(None),
    report: Optional[Path] = typer.Option(None, "--report", help="write the quality report (json, md, png) to this folder"),
    data: Optional[Path] = typer.Option(None, "--data", help="SpotWorld folder for calibration and the report (default: generated)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="torch checkpoint for KL (default: the manifest's)"),
    limit: int = typer.Option(50, "--limit", help="test records in the report"),
    kl_limit: Optional[int] = typer.Option(None, "--kl-limit", help="test records for KL and top-1 (default: "
                                                                     "min(--limit, 64))"),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="report: per-layer sensitivity (slow)"),
    recommend: bool = typer.Option(True, "--recommend/--no-recommend", help="report: record `recommended` in the manifest"),
    imatrix: bool = typer.Option(False, "--imatrix", help="quantize --llm TYPES with an importance matrix computed on "
                                 "SpotWorld train conversations (llama.cpp's tools: `make native`); variants "
                                 "are named TYPE-imatrix"),
    imatrix_records: Optional[int] = typer.Option(None, "--imatrix-records",
                                                  help="calibration conversations for --imatrix (default 600)"),
    imatrix_source: str = typer.Option("text", "--imatrix-source",
                                       help="text: llama-imatrix on the conversations' text; multimodal: the torch "
                                            "checkpoint's forward pass with their images and regions (--checkpoint "
                                            "or the manifest's)"),
) -> None:
    """Add quantized LLM / vision variants to a bundle (llama.cpp, onnxruntime, coremltools) and/or write a
    quality report (sizes, SPEC-6 accuracy, KL vs torch, cosine, latency) with a recommended default."""
    if not (llm or vision or coreml or report):
        raise InputError("nothing to do: give --llm / --vision / --coreml and/or --report DIR")
    share_cores_with_torch()  # the report's KL runs torch beside llama.cpp
    if llm or vision or coreml:
        from chatspot_edge.quantize import quantize_bundle

        summary = quantize_bundle(bundle, llm=llm, vision=vision, coreml=coreml, force=force, threads=threads,
                                  int8_method=int8_method, data=data, calib=calib, imatrix=imatrix,
                                  imatrix_records=imatrix_records, imatrix_source=imatrix_source,
                                  checkpoint=checkpoint, log=typer.echo)
        typer.echo(f"{bundle}: added {', '.join(summary['added']) or 'nothing'}"
                   + (f"; skipped {', '.join(summary['skipped'])}" if summary["skipped"] else ""))
    if report is not None:
        from chatspot_edge.quantize import quality_report

        r = quality_report(bundle, report, data=data, checkpoint=checkpoint, limit=limit, kl_limit=kl_limit,
                           threads=threads, sensitivity=sensitivity, recommend=recommend, log=typer.echo)
        for t in r["targets"]:
            mark = "-" if t["pass"] is None else ("ok" if t["pass"] else f"MISSED by {t['missed_by']:.4g}")
            value = "-" if t["value"] is None else f"{t['value']:.4g}"
            typer.echo(f"  {t['name']}: {value} ({t['target']}) {mark}")
        typer.echo(f"recommended: {r['recommended']['llm']} + {r['recommended']['vision']}")


@app.command()
def inspect(
    bundle: Path = typer.Argument(...),
    profile: Optional[str] = typer.Option(None, "--profile", help="also: which variants fit this device class "
                                          "(phone-4gb, phone-8gb, laptop), estimated from the manifest"),
) -> None:
    """Print a bundle's manifest and verify every checksum (exit 2 on a mismatch)."""
    import json

    from chatspot_edge.export import verify_bundle

    manifest = verify_bundle(bundle)
    typer.echo(json.dumps(manifest, indent=2))
    typer.echo(f"OK: {len(manifest['files'])} files verified")
    if profile:
        from chatspot_edge.benchmarks import profiles

        typer.echo(profiles.format_estimates(profiles.dry_run(bundle, [profile])))


THREADS_HELP = "threads for prefill (and decode, unless --decode-threads); default: measured on this machine"
DECODE_THREADS_HELP = "threads for decoding (one token at a time); default: measured on this machine"


@app.command()
def ask(
    bundle: Path = typer.Argument(...),
    image: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    point: Optional[str] = typer.Option(None, help="X,Y in pixels of the original image"),
    box: Optional[str] = typer.Option(None, help="X1,Y1,X2,Y2 in pixels"),
    polygon: Optional[str] = typer.Option(None, help="X1,Y1,X2,Y2,X3,Y3,... in pixels"),
    clip: bool = typer.Option(False, help="clip a region that crosses the image border instead of refusing it"),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help=DECODE_THREADS_HELP),
    llm: Optional[str] = typer.Option(None, help="LLM variant (e.g. Q4_K_M); default: the manifest's"),
    vision: Optional[str] = typer.Option(None, help="vision variant (fp32, fp16, int8)"),
    timings: bool = typer.Option(False, help="print TTFT, decode speed and thread counts to stderr"),
) -> None:
    """One answer about a region of an image, streamed. The region goes in front of the question, or where
    the question says {region}. An answer that reaches the end of the context stops there (a note on stderr)."""
    from chatspot_edge.runtime.cli import ask as run_ask

    run_ask(bundle, image, question, point, box, polygon, clip, max_tokens, temperature, threads, llm, vision, timings,
            decode_threads)


@app.command()
def chat(
    bundle: Path = typer.Argument(...),
    image: Path = typer.Argument(...),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help=DECODE_THREADS_HELP),
    llm: Optional[str] = typer.Option(None),
    vision: Optional[str] = typer.Option(None),
    max_tokens: int = typer.Option(256, "--max-tokens"),
) -> None:
    """Interactive multi-turn session on one image (/point, /box, /polygon, /image, /reset; /help). When the
    context is full, the oldest questions and answers leave it (the image and the system prompt stay)."""
    from chatspot_edge.runtime.cli import chat as run_chat

    run_chat(bundle, image, threads, llm, vision, max_tokens, decode_threads)


@app.command()
def serve(
    bundle: Path = typer.Argument(...),
    host: str = typer.Option("127.0.0.1", help="address to listen on (another than loopback needs --allow-remote)"),
    port: int = typer.Option(8000, help="port (0: any free port; the URL is printed)"),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="allow a non-loopback --host (no authentication: anyone who can reach it "
                                           "can use the model)"),
    llm: Optional[str] = typer.Option(None, help="LLM variant (e.g. Q4_K_M); default: the manifest's"),
    vision: Optional[str] = typer.Option(None, help="vision variant (fp32, fp16, int8)"),
    threads: Optional[int] = typer.Option(None),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="largest image upload"),
    max_queue: int = typer.Option(16, "--max-queue", help="requests waiting for the model; more get 503 + Retry-After"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds per request, queue wait included (504 after)"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="the longest answer a request may ask for"),
    session_ttl: float = typer.Option(1800.0, "--session-ttl", help="seconds an idle session is kept"),
    max_sessions: int = typer.Option(64, "--max-sessions", help="open sessions (images) at most"),
) -> None:
    """Local web page at / (click, drag a box or draw a polygon on your image; streamed answers) and an HTTP
    API described at /openapi.json, including an OpenAI-style /v1/chat/completions."""
    from chatspot_edge.runtime.server import ServeOptions, serve as run_serve

    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-queue", max_queue), ("--timeout", timeout),
                        ("--max-tokens", max_tokens), ("--session-ttl", session_ttl), ("--max-sessions", max_sessions)):
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    options = ServeOptions(max_queue=max_queue, timeout_s=timeout, max_upload_mb=max_upload_mb, max_tokens=max_tokens,
                           default_max_tokens=min(128, max_tokens), session_ttl_s=session_ttl, max_sessions=max_sessions)
    run_serve(bundle, host=host, port=port, allow_remote=allow_remote, llm=llm, vision=vision, threads=threads,
              options=options)


@app.command()
def doctor(
    bundle: Optional[Path] = typer.Argument(None, help="a bundle: try each of its variants here"),
    threads: Optional[int] = typer.Option(None, help="threads for the trial runs (default: the runtime's)"),
) -> None:
    """This machine: CPU and its instruction sets, the llama.cpp build's, threads, versions; with a BUNDLE, which
    of its variants run here. Exit 0: everything runs here; 1: something does not (the output says how to fix it)."""
    from chatspot_edge.doctor import doctor as run_doctor

    raise typer.Exit(run_doctor(bundle, threads=threads, out=typer.echo))


@app.command()
def pipeline(
    preset: str = typer.Option("mini"),
    out: Path = typer.Option(Path("runs/demo")),
    minutes: Optional[float] = typer.Option(None, help="training budget (default: the preset's)"),
    n_train: int = typer.Option(10000, "--n-train"),
    n_test: int = typer.Option(1000, "--n-test"),
) -> None:
    """The whole pipeline end to end (what `make demo` runs): data, adapt, eval, export, ask."""
    share_cores_with_torch()  # training, export and evaluation in this process; the benchmark runs in its own
    from chatspot_edge.pipeline import run_pipeline

    run_pipeline(preset=preset, out=out, minutes=minutes, n_train=n_train, n_test=n_test)


from chatspot_edge.benchmarks.cli import bench_app  # noqa: E402 - typer only; the benchmark loads lazily

app.add_typer(bench_app, name="bench")


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # click returns a command's typer.Exit code here instead of exiting
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # usage errors from click (typer vendors its own copy, so match by shape)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
