"""llama.cpp's own tools from the top-level CMakeLists.txt (`make native`), run once on a tiny GGUF: llama-quantize
(same tensors as the library's quantizer from Python), llama-bench (its JSON), llama-imatrix + imatrix quantization
of a bundle (`quantize --imatrix`), and the guard in front of them.

The build takes minutes; it is cached outside the clone (`make native`, which `make test` runs first), so the tests
only run the tools. Run alone, the fixture calls `make native` itself (a no-op when the build is cached)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from chatspot_edge import cpu, llama_tools
from chatspot_edge.errors import BuildError

pytestmark = pytest.mark.llama
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tools() -> Path:
    d = llama_tools.tools_dir()
    if d is None or not (d / "llama-bench").is_file():
        subprocess.run(["make", "-s", "native"], cwd=REPO, check=True, timeout=3600)
        d = llama_tools.tools_dir()
    assert d is not None and all((d / t).is_file() for t in ("llama-bench", "llama-quantize", "llama-imatrix"))
    return d


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset

    d = tmp_path_factory.mktemp("native")
    model, tok = build_preset("tiny", seed=0)
    return Path(export_bundle(save_checkpoint(model, tok, d / "ck"), d / "bundle", llm_dtype="f32"))


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in gguf.GGUFReader(str(path)).tensors}


def test_llama_quantize_equals_the_library(tools, tiny_bundle, tmp_path):
    from chatspot_edge.quantize.llm import quantize_gguf

    src = tiny_bundle / "llm-f32.gguf"
    log = llama_tools.quantize(src, tmp_path / "tool-q8_0.gguf", "Q8_0", threads=1)
    assert "quant size" in log and "model size" in log
    quantize_gguf(src, tmp_path / "lib-q8_0.gguf", "Q8_0", threads=1)
    a, b = _tensors(tmp_path / "tool-q8_0.gguf"), _tensors(tmp_path / "lib-q8_0.gguf")
    assert a.keys() == b.keys() and a == b  # same source, same build options: the very same bytes
    assert {typ for name, (typ, _) in a.items() if name.endswith("attn_q.weight")} == {"Q8_0"}


def test_llama_bench_json(tools, tiny_bundle):
    r = llama_tools.llama_bench(tiny_bundle / "llm-f32.gguf", threads=1, n_prompt=16, n_gen=8, repetitions=1)
    assert r["pp_tokens"] == 16 and r["tg_tokens"] == 8
    assert r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0
    assert r["build"]["backends"] == "CPU"


def test_imatrix_quantization_of_a_bundle(tools, tiny_bundle, tmp_path):
    import shutil

    from chatspot_edge.export import verify_bundle
    from chatspot_edge.quantize import quantize_bundle
    from chatspot_edge.runtime import Engine

    b = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    logs: list[str] = []
    summary = quantize_bundle(b, llm="q4_0", imatrix=True, imatrix_records=40, log=logs.append)
    quantize_bundle(b, llm="q4_0", log=logs.append)
    m = verify_bundle(b)
    assert summary["added"] == ["Q4_0-imatrix"] and set(m["llm_variants"]) == {"Q4_0", "Q4_0-imatrix"}
    e = m["llm_variants"]["Q4_0-imatrix"]
    assert e["file"] == "llm-q4_0-imatrix.gguf" and e["type"] == "Q4_0"
    info = e["imatrix"]
    assert info["chunks"] >= 2 and info["records"] == 40 and len(info["sha256"]) == 64
    # the importance matrix changed how blocks were rounded, not which types were chosen
    plain, imat = _tensors(b / "llm-q4_0.gguf"), _tensors(b / "llm-q4_0-imatrix.gguf")
    assert {k: t for k, (t, _) in plain.items()} == {k: t for k, (t, _) in imat.items()}
    assert sum(plain[k][1] != imat[k][1] for k in plain if plain[k][0] == "Q4_0") > 0
    from PIL import Image

    engine = Engine.load(b, llm="Q4_0-imatrix", threads=1)
    answer = engine.session(Image.new("RGB", (40, 40))).ask("What is {region}?", point=(3, 3), max_tokens=4,
                                                            stream=False)
    assert isinstance(answer, str)
    # again: nothing to do, the bundle untouched
    again = quantize_bundle(b, llm="q4_0", imatrix=True, imatrix_records=40, log=logs.append)
    assert again["added"] == [] and again["skipped"] == ["Q4_0-imatrix"]


def test_calibration_text_is_the_bundles_template(tiny_bundle):
    from chatspot_edge.export import verify_bundle
    from chatspot_edge.quantize.imatrix import calibration_text

    m = verify_bundle(tiny_bundle)
    text, desc = calibration_text(m, None, records=5)
    assert desc.startswith("5 conversations")
    assert text.count(m["prompt"]["system"]) == 5 and "<box>[" in text and "<image>" not in text
    assert text.count((m["prompt"]["stop"] or [""])[0]) >= 5


def test_tools_are_guarded(tools, monkeypatch, tmp_path):
    if not cpu.is_x86():
        pytest.skip("x86 instruction sets")
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: " + " ".join(sorted(cpu.cpu_features() - {"avx2"})) + "\n")
    monkeypatch.setenv(cpu.CPUINFO_ENV, str(info))
    with pytest.raises(BuildError, match=r"AVX2.*`make native`"):
        llama_tools.tool("llama-bench")


def test_missing_tools_name_the_fix(monkeypatch, tmp_path):
    from chatspot_edge.errors import InputError

    monkeypatch.setenv(llama_tools.TOOLS_ENV, str(tmp_path))
    with pytest.raises(InputError, match="make native"):
        llama_tools.tool("llama-imatrix")


def test_python_imatrix_pointer_equals_llama_quantize(tools, tiny_bundle, tmp_path):
    """llama_model_quantize's `imatrix` field (an array of {name, data, size}, NULL-terminated, in llama-cpp-python
    0.3.36) gives the very bytes llama-quantize --imatrix writes: docs/build.md relies on this measurement."""
    import ctypes

    import gguf

    from chatspot_edge.export import verify_bundle
    from chatspot_edge.quantize.imatrix import calibration_text
    from chatspot_edge.runtime.llama import _lib

    src = tiny_bundle / "llm-f32.gguf"
    text, _ = calibration_text(verify_bundle(tiny_bundle), None, records=40)
    (tmp_path / "c.txt").write_text(text)
    llama_tools.imatrix(src, tmp_path / "c.txt", tmp_path / "im.gguf", threads=1)
    llama_tools.quantize(src, tmp_path / "tool.gguf", "Q4_0", imatrix=tmp_path / "im.gguf", threads=1)
    t = {x.name: np.asarray(x.data, dtype=np.float32).ravel() for x in gguf.GGUFReader(str(tmp_path / "im.gguf")).tensors}
    means = {n[:-8]: np.ascontiguousarray(t[n] / t[n[:-8] + ".counts"][0], dtype=np.float32)
             for n in t if n.endswith(".in_sum2")}
    lib = _lib()
    arr = (lib.llama_model_imatrix_data * (len(means) + 1))()
    names = [n.encode() for n in means]
    for i, (name, v) in enumerate(zip(names, means.values())):
        arr[i].name, arr[i].data, arr[i].size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = lib.LLAMA_FTYPE_MOSTLY_Q4_0, 1
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
    assert lib.llama_model_quantize(str(src).encode(), str(tmp_path / "py.gguf").encode(), ctypes.byref(params)) == 0
    assert len(means) > 0 and _tensors(tmp_path / "py.gguf") == _tensors(tmp_path / "tool.gguf")


def test_multimodal_imatrix_quantization_of_a_bundle(tools, tiny_bundle, tmp_path):
    """`--imatrix-source multimodal`: the torch checkpoint's matrix (images and regions counted) in llama.cpp's
    GGUF imatrix format, read by llama-quantize; with an override recipe as `--tensor-type`."""
    import shutil

    from chatspot_edge.errors import InputError
    from chatspot_edge.export import verify_bundle
    from chatspot_edge.quantize import quantize_bundle

    b = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    logs: list[str] = []
    summary = quantize_bundle(b, llm="q4_0,q4_0:ffn_down=q8_0", imatrix=True, imatrix_source="multimodal",
                              imatrix_records=20, log=logs.append)  # the checkpoint the manifest names
    quantize_bundle(b, llm="q4_0", log=logs.append)
    m = verify_bundle(b)
    assert summary["added"] == ["Q4_0-imatrix", "Q4_0:ffn_down=Q8_0-imatrix"]
    info = m["llm_variants"]["Q4_0-imatrix"]["imatrix"]
    assert "included" in info["image_embeddings"] and info["records"] == 20 and info["tokens"] > 20
    plain, imat = _tensors(b / "llm-q4_0.gguf"), _tensors(b / "llm-q4_0-imatrix.gguf")
    assert sum(plain[k][1] != imat[k][1] for k in plain if plain[k][0] == "Q4_0") > 0  # the matrix was applied
    mixed = _tensors(b / m["llm_variants"]["Q4_0:ffn_down=Q8_0-imatrix"]["file"])
    assert {t for k, (t, _) in mixed.items() if ".ffn_down." in k} == {"Q8_0"}
    assert mixed["blk.0.attn_q.weight"] == imat["blk.0.attn_q.weight"]  # same matrix, same rounding elsewhere
    with pytest.raises(InputError, match="--imatrix-source"):
        quantize_bundle(b, llm="q4_0", imatrix=True, imatrix_source="pixels", log=logs.append)
