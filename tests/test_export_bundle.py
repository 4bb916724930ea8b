"""Bundle: manifest contract, verification, atomicity, and the full chain (llama.cpp + onnxruntime) vs torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chatspot_edge.model.preprocess import region_crops
from chatspot_edge.runtime.vision import OnnxRegion
from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.export import FORMAT, export_bundle, verify_bundle
from chatspot_edge.export import bundle as bundle_mod
from chatspot_edge.export.llama_check import LlamaCheck, split_segments
from chatspot_edge.export.onnx_vision import onnx_session
from chatspot_edge.files import file_sha256
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.processor import Processor


@pytest.fixture(scope="module")
def tiny(spread):
    """The tiny preset with weights whose greedy answers depend on the image and the region (tests/conftest.py)."""
    return spread


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return save_checkpoint(*tiny, tmp_path_factory.mktemp("ck") / "tiny-ckpt")


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    return export_bundle(ckpt, tmp_path_factory.mktemp("b") / "bundle", llm_dtype="f32")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_manifest_contract(bundle, ckpt, tiny):
    model, tok = tiny
    m = verify_bundle(bundle)
    assert m["format"] == FORMAT == "chatspot-edge-bundle/1"
    assert m["model"]["preset"] == "tiny" and m["model"]["parameters"]["total"] == model.num_parameters()["total"]
    prov = m["model"]["provenance"]
    assert prov["checkpoint_sha256"] == file_sha256(ckpt / "model.safetensors")
    assert set(prov["tools"]) >= {"torch", "gguf", "onnx", "onnxruntime", "transformers", "chatspot_edge"}
    assert m["image"] == {"height": 64, "width": 64, "resize": "bicubic", "tokens": 16}
    assert m["llm"] == {"file": "llm-f32.gguf", "quant": "F32", "n_embd": 64, "n_ctx": 1024}
    assert m["vision"]["file"] == "vision.onnx" and m["vision"]["precision"] == "fp32"
    assert m["prompt"] == Processor(tok, model.config).prompt.manifest()
    assert "{image}" in m["prompt"]["template"] and "{question}" in m["prompt"]["template"]
    ref = m["referring"]
    assert ref["format"] == "chatspot-text-v1" and ref["region_token"] is True
    assert ref["graph"] == "region.onnx" and ref["placeholder"] == "<region>"
    assert set(ref["inputs"]) == {"image_embeds", "boxes", "crops"} and set(ref["outputs"]) == {"region_embeds"}
    assert ref["crop"]["function"] == "chatspot_edge.model.preprocess.region_crops"
    assert [ref["crop"]["height"], ref["crop"]["width"]] == list(model.config.region_crop_size)
    st = m["special_tokens"]
    assert [st[k] for k in ("image", "box_start", "box_end", "region")] == [49152, 49153, 49154, 49155]
    assert st["eos"] in st["stop"] and tok.convert_tokens_to_ids("<|im_end|>") in st["stop"]
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in on_disk if f != "manifest.json"]
    for name, e in m["files"].items():
        assert e == {"sha256": file_sha256(bundle / name), "bytes": (bundle / name).stat().st_size}
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_verify_detects_tampering(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    p = b / "vision.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vision.onnx: sha256 mismatch"):
        verify_bundle(b)


def test_verify_detects_missing_truncated_unlisted_and_bad_manifest(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "region.onnx").unlink()
    with pytest.raises(BundleError, match="missing file region.onnx"):
        verify_bundle(b)
    shutil.copy(bundle / "region.onnx", b / "region.onnx")
    verify_bundle(b)
    with open(b / "llm-f32.gguf", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="llm-f32.gguf: .* bytes"):
        verify_bundle(b)
    shutil.copy(bundle / "llm-f32.gguf", b / "llm-f32.gguf")
    (b / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin is not listed"):
        verify_bundle(b)
    (b / "extra.bin").unlink()
    m = json.loads((b / "manifest.json").read_text())
    for mutate, msg in [
        (lambda d: d.update(format="other/1"), "format"),
        (lambda d: d.pop("llm"), "lacks `llm`"),
        (lambda d: d["image"].update(tokens="16"), "image.tokens"),
        (lambda d: d["files"].pop("vision.onnx"), "vision.onnx is named by the manifest"),
        (lambda d: d["files"].update({"../x": {"sha256": "0", "bytes": 1}}), "not a relative path"),
    ]:
        d = json.loads(json.dumps(m))
        mutate(d)
        (b / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(BundleError, match=msg) as e:
            verify_bundle(b)
        assert "\n" not in str(e.value)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing manifest.json"):
        verify_bundle(b)


def test_interrupted_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bundle_mod, "export_vision_onnx", boom)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bundle(ckpt, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(ckpt, tmp_path):
    with pytest.raises(InputError, match="llm-dtype"):
        export_bundle(ckpt, tmp_path / "b", llm_dtype="q4")
    with pytest.raises(InputError):
        export_bundle(tmp_path / "nope", tmp_path / "b")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a bundle"):
        export_bundle(ckpt, tmp_path / "precious")
    assert (tmp_path / "precious" / "keep.txt").exists()


def test_cli_inspect_exit_codes(bundle, tmp_path):
    exe = [sys.executable, "-c", "from chatspot_edge.cli import main; main()"]
    ok = subprocess.run(exe + ["inspect", str(bundle)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "files verified" in ok.stdout
    b = _copy(bundle, tmp_path)
    (b / "region.onnx").write_bytes(b"broken")
    bad = subprocess.run(exe + ["inspect", str(b)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


QUESTIONS = [
    "What is in <box>[0.100,0.200,0.450,0.610]</box>?",
    "What color is the object at <box>[0.412,0.533]</box>?",
    "Describe <box>[0.100,0.200,0.450,0.610,0.300,0.700]</box> and <box>[0.600,0.100,0.900,0.400]</box>.",
    "How many objects are there?",
    "Where is the red triangle?",
]


MOVED = (0.6, 0.6, 0.9, 0.9)  # a region elsewhere: its row replaces the question's own region rows


@pytest.mark.llama
def test_full_chain_greedy_matches_torch(bundle, tiny):
    """GGUF via llama.cpp + vision.onnx / region.onnx via onnxruntime == torch `generate` (8 greedy tokens), on
    inputs whose answers differ: another image, or another region row, changes torch's answer."""
    model, tok = tiny
    m = verify_bundle(bundle)
    proc = Processor(tok, model.config)
    st = m["special_tokens"]
    vision = onnx_session(bundle / m["vision"]["file"])
    region = OnnxRegion(bundle / m["referring"]["graph"])  # as the runtime feeds it: crops made from the original
    rng = np.random.default_rng(3)
    shape = (1, m["image"]["height"], m["image"]["width"], 3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
    cases = {}  # (question, image index, region moved?) -> (ids, image, boxes)
    for q in QUESTIONS:
        enc = proc.encode_prompt(q)
        for k, img in enumerate(images):
            cases[q, k, False] = (enc.ids, img, enc.boxes)
            if enc.boxes:
                cases[q, k, True] = (enc.ids, img, [MOVED] * len(enc.boxes))
    originals = [rng.integers(0, 256, (97, 150, 3), dtype=np.uint8) for _ in images]  # what crops are read from

    def crops(k: int, boxes) -> torch.Tensor | None:
        return torch.from_numpy(region_crops(originals[k], boxes, model.config.region_crop_size)) if boxes else None

    ref = {key: model.generate([ids], torch.from_numpy(img), [boxes], max_new_tokens=8, crops=crops(key[1], boxes))[0]
           for key, (ids, img, boxes) in cases.items()}
    # the check is not vacuous: a chain that dropped the image or the region rows would answer differently
    assert any(ref[q, 0, False] != ref[q, 1, False] for q in QUESTIONS)
    assert any(ref[key] != ref[key[:2] + (False,)] for key in ref if key[2])
    with LlamaCheck(bundle / m["llm"]["file"], n_ctx=256, n_threads=2) as lc:
        for key, (ids, img, boxes) in cases.items():
            emb = vision.run(["image_embeds"], {"image": img})[0]
            replace = {st["image"]: emb[0]}
            if boxes:
                replace[st["region"]] = region(emb, np.asarray(boxes, dtype=np.float32), img[0], originals[key[1]])
            got = lc.greedy(split_segments(ids, replace), max_new_tokens=8)
            assert got == ref[key], key


def test_no_region_token_bundle_with_coreml(tiny, tmp_path):
    """region_token false: no region graph, `referring` is exactly the SPEC's; --coreml adds vision.mlpackage."""
    pytest.importorskip("coremltools")
    from chatspot_edge.model.chatspot import ChatSpotModel

    model, tok = tiny
    cfg = type(model.config).from_dict({**model.config.to_dict(), "region_token": False})
    torch.manual_seed(2)
    plain = ChatSpotModel(cfg).eval()
    ck = save_checkpoint(plain, tok, tmp_path / "ck")
    b = export_bundle(ck, tmp_path / "b", coreml=True, llm_dtype="bf16")
    m = verify_bundle(b)
    assert m["referring"] == {"format": "chatspot-text-v1", "region_token": False}
    assert not (b / "region.onnx").exists()
    assert m["llm"]["file"] == "llm-bf16.gguf" and m["llm"]["quant"] == "BF16"
    cm = m["vision"]["coreml"]
    assert cm["file"] == "vision.mlpackage" and cm["input_dtype"] == "int32" and cm["precision"] == "fp16"
    assert any(f.startswith("vision.mlpackage/") for f in m["files"])
    assert "coremltools" in m["model"]["provenance"]["tools"]


@pytest.mark.llama
def test_llava_folder_exports_and_runs(tmp_path):
    """A Hugging Face LLaVA folder (CLIP tower) goes through the same export; llama.cpp + onnxruntime match torch."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.model.tokenizer import smollm2_tokenizer

    tok = smollm2_tokenizer()
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, projection_dim=32)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc,
                                                   image_token_index=tok.convert_tokens_to_ids("<image>"))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as the `spread` fixture: greedy answers that depend on the image
        for name, p in hf.named_parameters():
            if "language_model" in name and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.35))
        hf.model.multi_modal_projector.linear_2.weight.mul_(30.0)
        hf.model.multi_modal_projector.linear_2.bias.mul_(30.0)
    folder = tmp_path / "llava"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    b = export_bundle(folder, tmp_path / "b", llm_dtype="f32")
    m = verify_bundle(b)
    assert m["image"]["height"] == 32 and m["image"]["tokens"] == 16 and m["llm"]["n_embd"] == 48
    assert "checkpoint_files_sha256" in m["model"]["provenance"] or "checkpoint_sha256" in m["model"]["provenance"]
    assert m["referring"] == {"format": "chatspot-text-v1", "region_token": False}  # LLaVA has no region encoder
    model, tok2 = load_checkpoint(folder)
    proc = Processor(tok2, model.config)
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    assert enc.boxes == [] and model.config.region_token_id not in enc.ids  # the region is its text alone
    imgs = [np.random.default_rng(s).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8) for s in (0, 1)]
    refs = [model.generate([enc.ids], torch.from_numpy(img), [[]], max_new_tokens=8)[0] for img in imgs]
    assert refs[0] != refs[1]  # the answer depends on the image: a chain that lost it would not match
    vision = onnx_session(b / "vision.onnx")
    with LlamaCheck(b / m["llm"]["file"], n_ctx=128) as lc:
        for img, ref in zip(imgs, refs):
            emb = vision.run(["image_embeds"], {"image": img})[0]
            with torch.no_grad():
                ref_emb = model.encode_image(torch.from_numpy(img)).numpy()
            assert np.abs(emb - ref_emb).max() <= 1e-5 * np.abs(ref_emb).max()
            got = lc.greedy(split_segments(enc.ids, {m["special_tokens"]["image"]: emb[0]}), max_new_tokens=8)
            assert got == ref
