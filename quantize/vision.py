"""Vision variants: ONNX fp16 and int8 (dynamic, or static QDQ per-channel calibrated on SpotWorld images),
Core ML int8 / palettized; and how far each one's embeddings are from the fp32 graph's, and how fast it runs.

Every ONNX variant keeps the SPEC-3 interface: input `image` uint8 `[1, H, W, 3]`, output `image_embeds`
float32 `[1, N, d]` (fp16: casts inside the graph; int8: the uint8 -> float cast and normalization stay
float, quantize / dequantize pairs sit around the convolutions and matrix products).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chatspot_edge.errors import InputError

VISION_PRECISIONS = ("fp16", "int8")
INT8_METHODS = ("static-qdq-per-channel", "dynamic")
COREML_VARIANTS = {  # key -> (file, description)
    "int8": ("vision-int8.mlpackage", "linear int8 weights (symmetric, per channel)"),
    "palettized-6bit": ("vision-pal6.mlpackage", "6-bit k-means palettized weights (per tensor)"),
    "palettized-4bit": ("vision-pal4.mlpackage", "4-bit k-means palettized weights (per tensor)"),
}
COREML_NOTE = "written and checked on Linux; Core ML prediction runs on macOS only (not measured here)"


def vision_file_name(precision: str) -> str:
    return f"vision-{precision}.onnx"


def parse_precision(name: str) -> str:
    key = name.strip().lower()
    if key not in VISION_PRECISIONS:
        raise InputError(f"unknown vision precision {name!r} (choose from {', '.join(VISION_PRECISIONS)})")
    return key


# -- images ------------------------------------------------------------------------------------------------------


def spotworld_images(n: int, size: tuple[int, int], resize: str = "bicubic", data: str | Path | None = None,
                     split: str = "train", seed: int = 1234, offset: int = 0) -> list[np.ndarray]:
    """`n` resized uint8 `[H, W, 3]` SpotWorld images: from the dataset folder `data` (its `split`), or
    generated in memory (SpotWorld `seed`, samples offset..offset+n-1) when no folder is given."""
    from chatspot_edge.model.preprocess import resize_pixels

    out: list[np.ndarray] = []
    if data is not None:
        from chatspot_edge.data import load_image, load_split

        records = load_split(data, split)
        seen: set[str] = set()
        for r in records[offset:]:
            if r["image"] in seen:
                continue
            seen.add(r["image"])
            out.append(resize_pixels(load_image(data, r), size, resize))
            if len(out) >= n:
                break
        if not out:
            raise InputError(f"{data}: no {split} images for calibration")
        return out
    from chatspot_edge.data.spotworld import make_sample

    for i in range(offset, offset + n):
        out.append(resize_pixels(make_sample(seed, split, i).image, size, resize))
    return out


# -- conversions -------------------------------------------------------------------------------------------------


def _check_io(path: Path, like: Path) -> None:
    """The variant must have the fp32 graph's interface (names, dtypes) and run."""
    import onnx

    onnx.checker.check_model(str(path))
    a, b = onnx.load(str(path), load_external_data=False), onnx.load(str(like), load_external_data=False)
    sig = lambda m: ([(i.name, i.type.tensor_type.elem_type) for i in m.graph.input],  # noqa: E731
                     [(o.name, o.type.tensor_type.elem_type) for o in m.graph.output])
    if sig(a) != sig(b):
        raise RuntimeError(f"{path.name}: interface {sig(a)} differs from {like.name}'s {sig(b)}")


def to_fp16(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """fp32 graph -> fp16 weights and compute; the uint8 input and the float32 output are kept (casts inside).
    onnxruntime ships onnxconverter-common's converter (`onnxruntime.transformers.float16`)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    _check_io(dst, src)
    return {"method": "fp16 weights and activations (onnxruntime.transformers.float16, uint8 in / float32 out)"}


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs warnings on the root logger (e.g. for the uint8 image input)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _pre_process(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def to_int8_dynamic(src: str | Path, dst: str | Path, work: Path) -> dict[str, Any]:
    """Dynamic quantization: int8 weights, activations quantized at run time per tensor. onnxruntime's CPU
    ConvInteger takes uint8 weights only, hence QUInt8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    pre = _pre_process(src, work / "pre-dynamic.onnx")
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QUInt8, per_channel=False)
    _check_io(dst, src)
    return {"method": "dynamic", "weights": "uint8 per tensor", "activations": "uint8, dynamic range"}


class _Reader:
    """onnxruntime CalibrationDataReader over resized SpotWorld images."""

    def __init__(self, name: str, images: Sequence[np.ndarray]):
        self.name = name
        self.images = list(images)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        x = self.images[self.i]
        self.i += 1
        return {self.name: x[None]}

    def rewind(self) -> None:
        self.i = 0


def to_int8_static(src: str | Path, dst: str | Path, images: Sequence[np.ndarray], work: Path,
                   calibrate: str = "minmax", keep_float: Sequence[str] | None = None) -> dict[str, Any]:
    """Static QDQ quantization: int8 per-channel weights, uint8 activations with ranges calibrated on
    `images` (after `quant_pre_process`: shape inference + graph optimization).

    keep_float: node names left in float; default: the first two convolutions (EfficientNet: the stem, which
    reads the normalized image, and the first depthwise convolution). Measured on smol's EfficientNet-Lite0
    (per-layer sensitivity, one layer int8 at a time): those two are the only layers whose lone quantization
    costs more than 0.001 of embedding cosine (0.9954 and 0.9957). With the stem in int8 the graph is no
    faster than fp32 (a 3-input-channel int8 convolution plus the requantization of the image cost what the
    rest saves); keeping the first depthwise convolution in float too raises the mean cosine from 0.9949 to
    0.9974 at the same speed (1.69x fp32, 32 test images, 2 threads)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    pre = _pre_process(src, work / "pre-static.onnx")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if calibrate == "percentile":
        extra["CalibPercentile"] = 99.999
    import onnx

    graph = onnx.load(str(pre), load_external_data=False).graph
    input_name = graph.input[0].name
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    exclude = list(keep_float) if keep_float is not None else convs[:2]
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_static(str(pre), str(dst), _Reader(input_name, images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrate], extra_options=extra, nodes_to_exclude=exclude or None)
    _check_io(dst, src)
    return {"method": "static-qdq-per-channel", "weights": "int8 symmetric per channel",
            "activations": f"uint8 per tensor, {calibrate} calibration on {len(images)} SpotWorld images",
            "float_nodes": exclude}


# -- measurements ------------------------------------------------------------------------------------------------


def session(path: str | Path, threads: int = 2):
    """An onnxruntime CPU session as the runtime makes it (`runtime.vision.cpu_session`)."""
    from chatspot_edge.runtime.vision import cpu_session

    return cpu_session(path, threads)


def embed(sess, images: Sequence[np.ndarray]) -> np.ndarray:
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    return np.concatenate([sess.run([out], {name: x[None]})[0] for x in images], 0).astype(np.float32)


def cosine_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Per-token cosine of `[B, N, d]` embeddings: mean over images of each image's mean, the worst image's
    mean, and the worst single token."""
    num = (ref * got).sum(-1)
    den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)
    cos = num / np.maximum(den, 1e-12)
    per_image = cos.mean(-1)
    return {"cosine_mean": float(per_image.mean()), "cosine_min": float(per_image.min()),
            "cosine_token_min": float(cos.min())}


def time_sessions(sessions: dict[str, Any], image: np.ndarray, runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each session on one image, runs interleaved across the sessions (so
    a load change on a shared machine hits them all alike)."""
    feeds = {k: ({s.get_inputs()[0].name: image[None]}, [s.get_outputs()[0].name]) for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(feeds[k][1], feeds[k][0])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(feeds[k][1], feeds[k][0])
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def compare(reference: Path, variants: dict[str, Path], images: Sequence[np.ndarray], threads: int = 2,
            runs: int = 20) -> dict[str, dict[str, Any]]:
    """{name: {"ms", "cosine_mean", "cosine_min", "cosine_token_min", "speedup"}} for `variants` and
    "fp32" (the reference graph itself)."""
    sessions = {"fp32": session(reference, threads), **{k: session(p, threads) for k, p in variants.items()}}
    ref = embed(sessions["fp32"], images)
    out: dict[str, dict[str, Any]] = {}
    for k, s in sessions.items():
        out[k] = cosine_stats(ref, embed(s, images)) if k != "fp32" else \
            {"cosine_mean": 1.0, "cosine_min": 1.0, "cosine_token_min": 1.0}
    ms = time_sessions(sessions, images[0], runs=runs) if runs > 0 else {}
    for k in out:
        if k in ms:
            out[k]["ms"] = round(ms[k], 3)
            out[k]["speedup"] = round(ms["fp32"] / max(ms[k], 1e-9), 3)
    return out


def build_int8(src: Path, dst: Path, images: Sequence[np.ndarray], eval_images: Sequence[np.ndarray],
               method: str = "auto", threads: int = 2, runs: int = 20, min_cosine: float = 0.999,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the int8 variant. method "auto": build both candidates, measure speed and cosine against the
    fp32 graph on `eval_images`, keep the fastest one whose mean cosine >= `min_cosine` (else the one with the
    highest cosine). Returns the manifest fields (method, measurements of every candidate, why)."""
    if method not in ("auto", *INT8_METHODS, "static", "dynamic"):
        raise InputError(f"--int8-method {method!r}: choose auto, static or dynamic")
    method = {"static": "static-qdq-per-channel"}.get(method, method)
    wanted = INT8_METHODS if method == "auto" else (method,)
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=dst.parent))
    try:
        built: dict[str, tuple[Path, dict]] = {}
        for m in wanted:
            out = work / f"{m}.onnx"
            info = to_int8_static(src, out, images, work) if m == "static-qdq-per-channel" else \
                to_int8_dynamic(src, out, work)
            built[m] = (out, info)
        meas = compare(src, {m: p for m, (p, _) in built.items()}, eval_images, threads, runs)
        cands = {m: {**built[m][1], **meas[m], "bytes": built[m][0].stat().st_size} for m in built}
        ok = [m for m in cands if cands[m]["cosine_mean"] >= min_cosine]
        if ok:
            best = min(ok, key=lambda m: cands[m].get("ms", 0.0))
            why = (f"fastest int8 method with mean cosine >= {min_cosine}" if len(cands) > 1
                   else "method chosen by --int8-method")
        else:
            best = max(cands, key=lambda m: cands[m]["cosine_mean"])
            why = f"no int8 method reached mean cosine {min_cosine}; kept the most accurate one"
        for m, c in cands.items():
            log(f"  int8 {m}: {c.get('ms', float('nan')):.2f} ms (fp32 {meas['fp32'].get('ms', float('nan')):.2f} ms), "
                f"cosine mean {c['cosine_mean']:.5f} min {c['cosine_min']:.5f}")
        shutil.move(str(built[best][0]), str(dst))
        return {"method": best, "why": why, "fp32_ms": meas["fp32"].get("ms"),
                "candidates": {m: {k: v for k, v in c.items() if k != "method"} for m, c in cands.items()},
                **{k: v for k, v in cands[best].items() if k != "method"}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


REGION_FLOAT_LAYERS = ("/region/geometry/", "/region/relative/", "/region/proj/proj.0/")  # see region_to_int8


def region_to_int8(src: Path, dst: Path, vision: Path, eval_images: Sequence[np.ndarray], threads: int = 2,
                   boxes_per_image: int = 4, seed: int = 0) -> dict[str, Any]:
    """The region graph with int8 weights in its matrix products (dynamic quantization of Gemm / MatMul, per
    output channel; the RoI crop's small convolutions stay float). Measured: cosine of the region embeddings
    against the fp32 graph on `eval_images` (image_embeds from the fp32 `vision` graph, random boxes)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The box-geometry and relative-geometry views and the first layer of the context view stay float: their inputs
    # (the cell-pooled image embedding, the boxes' Fourier features and ratios, the relation words' probabilities)
    # are few values over a wide range, which dynamic per-tensor activation quantization rounds badly (measured on
    # the tiny preset: cosine min 0.958 with the geometry layer in int8, 0.993 with the context layer, >= 0.9999
    # for every other layer); the relative view ends in a softmax over relation words, where a rounded input can
    # change the word written into the embedding. They hold a small share of the weights.
    # The quantizer turns a Gemm into "<name>_MatMul" first, hence both names.
    keep_float = [n.name + suffix for n in onnx.load(str(src), load_external_data=False).graph.node
                  if n.op_type in ("Gemm", "MatMul") and any(k in n.name for k in REGION_FLOAT_LAYERS)
                  for suffix in ("", "_MatMul")]
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["Gemm", "MatMul"], nodes_to_exclude=keep_float)
    _check_io(dst, src)
    from chatspot_edge.runtime.vision import OnnxRegion

    ref, got = OnnxRegion(src, threads), OnnxRegion(dst, threads)  # fed by name, as the runtime feeds them
    embeds = embed(session(vision, threads), eval_images)
    rng = np.random.default_rng(seed)
    a, b = [], []
    for image, emb in zip(eval_images, embeds):
        lo = rng.uniform(0.0, 0.7, (boxes_per_image, 2))
        boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.3, (boxes_per_image, 2))], 1).astype(np.float32)
        a.append(ref(emb, boxes, image, image))  # the resized image stands in for the original (crops)
        b.append(got(emb, boxes, image, image))
    stats = cosine_stats(np.concatenate(a)[:, None], np.concatenate(b)[:, None])  # per region
    return {"file": dst.name, "method": "dynamic int8 weights (Gemm / MatMul, per channel)",
            "bytes": dst.stat().st_size, "cosine_mean": stats["cosine_mean"], "cosine_min": stats["cosine_min"],
            "measured_on": f"{len(eval_images)} SpotWorld test images x {boxes_per_image} random boxes"}


# -- Core ML -----------------------------------------------------------------------------------------------------


def kmeans_lut(nbits: int, iters: int = 25) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A coremltools `lut_function`: 1-D k-means (Lloyd, quantile start) of a weight group into 2**nbits
    values, in numpy (coremltools' own "kmeans" mode needs scikit-learn, which is not a dependency)."""
    k = 1 << nbits

    def lut_function(val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(val, dtype=np.float64).ravel()
        c = np.quantile(x, (np.arange(k) + 0.5) / k)
        for _ in range(iters):
            idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
            counts = np.bincount(idx, minlength=k)
            sums = np.bincount(idx, weights=x, minlength=k)
            new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
            if np.allclose(new, c):
                break
            c = np.sort(new)
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        return c.astype(val.dtype), idx.astype(np.uint8)

    return lut_function


def _palettizer(nbits: int, **granularity):
    import importlib.util

    import coremltools.optimize.coreml as cto

    if importlib.util.find_spec("sklearn") is not None:
        return cto.OpPalettizerConfig(nbits=nbits, mode="kmeans", **granularity)
    return cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut(nbits), **granularity)


def coreml_variant(src: Path, dst: Path, key: str) -> dict[str, Any]:
    """Compress the bundle's `vision.mlpackage` weights (coremltools.optimize.coreml) into `dst`."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    if key not in COREML_VARIANTS:
        raise InputError(f"unknown Core ML variant {key!r} (choose from {', '.join(COREML_VARIANTS)})")
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(src), skip_model_load=True)
        if key == "int8":
            cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel"))
            out = cto.linear_quantize_weights(model, config=cfg)
        elif key == "palettized-6bit":
            cfg = cto.OptimizationConfig(global_config=_palettizer(6, granularity="per_tensor"))
            out = cto.palettize_weights(model, config=cfg)
        else:  # per-grouped-channel palettes need iOS 18; the exported package targets iOS 16
            cfg = cto.OptimizationConfig(global_config=_palettizer(4, granularity="per_tensor"))
            out = cto.palettize_weights(model, config=cfg)
        out.save(str(dst))
    spec = ct.utils.load_spec(str(dst))
    ins = [i.name for i in spec.description.input]
    outs = [o.name for o in spec.description.output]
    if ins != ["image"] or outs != ["image_embeds"]:
        raise RuntimeError(f"{dst.name}: inputs {ins} / outputs {outs}, expected image / image_embeds")
    return {"precision": key, "method": COREML_VARIANTS[key][1], "note": COREML_NOTE}


def _consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def layer_sensitivity(src: Path, images: Sequence[np.ndarray], eval_images: Sequence[np.ndarray], work: Path,
                      threads: int = 2, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per layer: the mean cosine to fp32 when ONLY that Conv / MatMul / Gemm (with its ReLU6 / Clip, whose
    range then sets the output's) is int8 (static QDQ, per channel). Lowest cosine (most sensitive) first."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    pre = _pre_process(Path(src), work / "pre-sensitivity.onnx")
    graph = onnx.load(str(pre), load_external_data=False).graph
    ref = embed(session(src, threads), eval_images)
    input_name = graph.input[0].name
    out = []
    layers = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    for k, node in enumerate(layers):
        names = [node.name] + [c.name for c in _consumers(graph, node.output[0]) if c.op_type in ("Clip", "Relu")]
        dst = work / "one-layer.onnx"
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(dst), _Reader(input_name, images), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=names, extra_options={"ActivationSymmetric": False,
                                                                    "WeightSymmetric": True})
        c = cosine_stats(ref, embed(session(dst, threads), eval_images))
        out.append({"layer": node.name, "op": node.op_type, "cosine_mean": round(c["cosine_mean"], 6),
                    "loss": round(1.0 - c["cosine_mean"], 6)})
        log(f"  vision sensitivity {k + 1}/{len(layers)}: {node.name} cosine {c['cosine_mean']:.5f}")
    out.sort(key=lambda r: r["cosine_mean"])
    return out
