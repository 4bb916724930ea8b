"""Bundle manifest (SPEC section 3): build, write, read and verify `manifest.json`.

`files` lists every file of the bundle except `manifest.json` itself (folders such as `vision.mlpackage`
are listed file by file, by their POSIX path relative to the bundle), each with its sha256 and size.
`verify_bundle` checks the format and required fields, that every file the manifest names is listed, and
every listed file's size and sha256; any problem raises `BundleError` with one line.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.files import atomic_write_text, file_sha256
from chatspot_edge.referring import TEXT_FORMAT, ReferringFormat

FORMAT = "chatspot-edge-bundle/1"
MANIFEST = "manifest.json"
REFERRING_FORMAT = TEXT_FORMAT  # the default; chatspot-loc-v1 bundles also carry `referring.bins`

_TOOLS = {"torch": "torch", "gguf": "gguf", "onnx": "onnx", "onnxruntime": "onnxruntime",
          "transformers": "transformers", "llama_cpp_python": "llama_cpp_python"}


# the two kinds of variant: (default entry key, variants key, the field that names a variant)
VARIANT_KINDS = {"llm": ("llm", "llm_variants", "quant"), "vision": ("vision", "vision_variants", "precision")}


def variant_entries(manifest: dict, kind: str) -> list[tuple[str, dict, bool]]:
    """[(name, entry, is_default)] of one kind ("llm" or "vision"): the default entry first, then every
    variant, each named by its quant / precision tag (else its manifest key). A variant that repeats the
    default's file or an earlier name is listed once."""
    default_key, key, tag = VARIANT_KINDS[kind]
    default = manifest[default_key]
    out = [(str(default.get(tag) or "default"), default, True)]
    extra = manifest.get(key) or {}
    items = extra.items() if isinstance(extra, dict) else ((None, e) for e in extra)
    for k, e in items:
        if not isinstance(e, dict):
            continue
        name = str(e.get(tag) or k)
        if e.get("file") == default.get("file") or any(name.lower() == n.lower() for n, _, _ in out):
            continue
        out.append((name, e, False))
    return out


def region_graph(manifest: dict, vision_entry: dict) -> str | None:
    """The region graph that goes with a vision variant: its own `region_graph` (a quantized copy, e.g. the
    int8 variant's) or else the bundle's `referring.graph`; None when the model has no region embedding."""
    ref = manifest.get("referring") or {}
    if not ref.get("region_token"):
        return None
    own = vision_entry.get("region_graph")
    return own["file"] if isinstance(own, dict) else (ref.get("graph") or None)


def split_variant_pair(item: str) -> tuple[str, str | None]:
    """"LLM[:VISION]" -> (LLM, VISION or None). An LLM name may itself hold colons (a recipe such as
    "Q4_K_M:ffn_down=Q6_K"), so VISION is the part after the last colon unless that part is an override
    (has "="): "Q4_K_M:int8" -> ("Q4_K_M", "int8"); "Q4_K_M:ffn_down=Q6_K" -> (that, None)."""
    head, sep, tail = item.strip().rpartition(":")
    if not sep or "=" in tail:
        return item.strip(), None
    return head, tail or None


def find_variant(manifest: dict, kind: str, name: str | None) -> tuple[str, dict, bool]:
    """The entry of variant `name` (case-insensitive tag or manifest key; None or "default": the default).
    Raises InputError naming the variants the bundle has."""
    entries = variant_entries(manifest, kind)
    if name is None or name.lower() == "default":
        return entries[0]
    extra = manifest.get(VARIANT_KINDS[kind][1])
    by_key = {str(k).lower(): e for k, e in extra.items()} if isinstance(extra, dict) else {}
    for entry in entries:
        if name.lower() == entry[0].lower() or by_key.get(name.lower()) is entry[1]:
            return entry
    what = "LLM" if kind == "llm" else kind
    raise InputError(f"bundle has no {what} variant {name!r} (has: {', '.join(n for n, _, _ in entries)})")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    import chatspot_edge

    out = {}
    for key, dist in {**_TOOLS, **{e: e for e in extra}}.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    out["chatspot_edge"] = chatspot_edge.__version__
    return out


def bundle_files(bundle: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix name: {"sha256", "bytes"}} for every file under `bundle` except the manifest."""
    bundle = Path(bundle)
    out = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and not p.is_symlink():
            name = p.relative_to(bundle).as_posix()
            if name == MANIFEST:
                continue
            out[name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    return out


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Recompute `files` from the folder's contents and write `manifest.json` atomically. Returns it."""
    manifest = dict(manifest)
    manifest["files"] = bundle_files(bundle)
    atomic_write_text(Path(bundle) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# -- reading and verification ----------------------------------------------------------------------------------


def _fail(bundle: Path, msg: str) -> BundleError:
    return BundleError(f"{bundle}: {msg}")


def _require(bundle: Path, d: Any, where: str, fields: dict[str, type | tuple[type, ...]]) -> None:
    if not isinstance(d, dict):
        raise _fail(bundle, f"manifest `{where}` must be an object")
    for k, t in fields.items():
        if k not in d:
            raise _fail(bundle, f"manifest `{where}` lacks `{k}`")
        v = d[k]
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise _fail(bundle, f"manifest `{where}.{k}` has the wrong type ({type(v).__name__})")


def _safe_name(bundle: Path, name: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise _fail(bundle, f"manifest file name {name!r} is not a relative path inside the bundle")


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """Parse and validate `manifest.json` (format and fields; no checksums). Raises BundleError."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise _fail(bundle, "not a bundle folder")
    path = bundle / MANIFEST
    if not path.is_file():
        raise _fail(bundle, f"missing {MANIFEST}")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _fail(bundle, f"{MANIFEST} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(m, dict):
        raise _fail(bundle, f"{MANIFEST} must hold a JSON object")
    if m.get("format") != FORMAT:
        raise _fail(bundle, f"manifest format {m.get('format')!r}, expected {FORMAT!r}")
    _require(bundle, m, "manifest", {"model": dict, "image": dict, "llm": dict, "vision": dict, "prompt": dict,
                                     "referring": dict, "files": dict})
    _require(bundle, m["image"], "image", {"height": int, "width": int, "resize": str, "tokens": int})
    if min(m["image"]["height"], m["image"]["width"], m["image"]["tokens"]) <= 0:
        raise _fail(bundle, "manifest `image` sizes must be positive")
    # variants: one entry per variant, keyed by its name ({"Q4_K_M": {...}, ...})
    for key, fields in (("llm", {"file": str, "quant": str, "n_embd": int, "n_ctx": int}),
                        ("vision", {"file": str, "precision": str})):
        _require(bundle, m[key], key, fields)
        variants = m.get(f"{key}_variants") or {}
        if not isinstance(variants, dict):
            raise _fail(bundle, f"manifest `{key}_variants` must map variant names to entries")
        for name, e in variants.items():
            _require(bundle, e, f"{key}_variants[{name}]", fields)
    llms = [m["llm"], *(m.get("llm_variants") or {}).values()]
    visions = [m["vision"], *(m.get("vision_variants") or {}).values()]
    _require(bundle, m["prompt"], "prompt", {"system": str, "template": str, "stop": list})
    for key in ("{image}", "{question}"):
        if key not in m["prompt"]["template"]:
            raise _fail(bundle, f"manifest prompt template lacks {key}")
    _require(bundle, m["referring"], "referring", {"format": str, "region_token": bool})
    try:  # chatspot-text-v1, or chatspot-loc-v1 with its `bins`
        ReferringFormat.from_dict(m["referring"])
    except InputError as e:
        raise _fail(bundle, f"manifest `referring`: {e}") from None
    if m["referring"]["region_token"]:
        _require(bundle, m["referring"], "referring", {"graph": str, "inputs": dict, "outputs": dict})
    for name, entry in m["files"].items():
        _safe_name(bundle, name)
        _require(bundle, entry, f"files[{name}]", {"sha256": str, "bytes": int})
    named = [e["file"] for e in llms + visions]
    if m["referring"]["region_token"]:
        named.append(m["referring"]["graph"])
        for e in visions:
            if e.get("region_graph") is not None:
                _require(bundle, e["region_graph"], "vision variant region_graph", {"file": str})
                named.append(e["region_graph"]["file"])
    for e in visions:
        if isinstance(e.get("coreml"), dict) and isinstance(e["coreml"].get("file"), str):
            named.append(e["coreml"]["file"])
    for name in named:
        _safe_name(bundle, name)
        if name not in m["files"] and not any(f.startswith(name.rstrip("/") + "/") for f in m["files"]):
            raise _fail(bundle, f"{name} is named by the manifest but not listed in `files`")
    return m


def verify_bundle(bundle: str | Path, only: Iterable[str] | None = None) -> dict[str, Any]:
    """Validate the manifest and every listed file (presence, size, sha256); no unlisted files besides
    dot-files. With `only` (file names, or folder prefixes such as "vision.mlpackage/"), hash just those:
    what a runtime is about to load. Returns the manifest; raises BundleError with one line on the first
    problem."""
    bundle = Path(bundle)
    m = read_manifest(bundle)
    wanted = None if only is None else tuple(only)
    for name, entry in m["files"].items():
        if wanted is not None and not any(name == w or name.startswith(w.rstrip("/") + "/") for w in wanted):
            continue
        p = bundle / name
        if not p.is_file():
            raise _fail(bundle, f"missing file {name}")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise _fail(bundle, f"{name}: {size} bytes, manifest says {entry['bytes']}")
        if file_sha256(p) != entry["sha256"]:
            raise _fail(bundle, f"{name}: sha256 mismatch (file changed or corrupt)")
    for p in bundle.rglob("*"):
        rel = p.relative_to(bundle)
        if p.is_file() and rel.as_posix() != MANIFEST and rel.as_posix() not in m["files"] \
                and not any(part.startswith(".") for part in rel.parts):
            raise _fail(bundle, f"{rel.as_posix()} is not listed in the manifest")
    return m


def default_n_ctx(max_positions: int, default: int = 2048) -> int:
    return int(min(default, max_positions)) if max_positions and not math.isinf(max_positions) else default
