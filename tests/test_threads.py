"""Thread counts (issue 18): prefill and decode counts reach llama.cpp, measured ones are cached per machine, and
the OpenMP wait policy stays out of the runtime's processes. No timing assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatspot_edge.errors import InputError
from chatspot_edge.runtime import Engine
from chatspot_edge.runtime.threads import cache_path, candidates

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("threads")
    save_checkpoint(*tiny, d / "ck")
    return export_bundle(d / "ck", d / "bundle", llm_dtype="f16")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATSPOT_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "threads.json"


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def test_given_counts_reach_llama_cpp(bundle):
    e = Engine.load(bundle, threads=2, decode_threads=1)
    assert e.llm.thread_counts() == (2, 1)  # (n_threads_batch, n_threads) as llama.cpp's context holds them
    assert (e.thread_plan.prefill, e.thread_plan.decode, e.thread_plan.source) == (2, 1, "given")
    assert e.vision.session.get_session_options().intra_op_num_threads == 2
    e.llm.set_threads(prefill=1, decode=2)
    assert e.llm.thread_counts() == (1, 2)
    e.close()
    e = Engine.load(bundle, threads=1)  # one count: both phases, as before the split
    assert e.llm.thread_counts() == (1, 1)
    with pytest.raises(InputError, match="at least 1"):
        Engine.load(bundle, decode_threads=0)


def test_measured_counts_are_applied_and_cached(bundle, own_cache):
    e = Engine.load(bundle)
    plan = e.thread_plan
    assert plan.source == "calibrated" and {plan.prefill, plan.decode} <= set(candidates())
    assert e.llm.thread_counts() == (plan.prefill, plan.decode)
    m = plan.measured
    assert set(m["prefill_ms"]) == set(m["decode_ms_per_token"]) == {str(t) for t in candidates()}
    assert all(v > 0 for v in list(m["prefill_ms"].values()) + list(m["decode_ms_per_token"].values()))
    assert e.llm.seq_positions(0) == (-1, -1)  # the probe left nothing in the cache
    answer = e.session(_image()).ask("What?", max_tokens=4, stream=False)
    cached = json.loads(own_cache.read_text())
    assert len(cached) == 1 and [(v["prefill"], v["decode"]) for v in cached.values()] == [(plan.prefill, plan.decode)]
    again = Engine.load(bundle)
    assert again.thread_plan.source == "cached" and again.llm.thread_counts() == (plan.prefill, plan.decode)
    assert again.session(_image()).ask("What?", max_tokens=4, stream=False) == answer
    recalibrated = Engine.load(bundle, recalibrate=True).thread_plan  # measured again: may choose other counts
    assert recalibrated.source == "calibrated"
    assert [(v["prefill"], v["decode"]) for v in json.loads(own_cache.read_text()).values()] == [
        (recalibrated.prefill, recalibrated.decode)]  # the new measurement replaced the cached one
    mixed = Engine.load(bundle, decode_threads=1)  # a given decode count beside the measured prefill count
    assert mixed.thread_plan.source == "cached+given" and mixed.llm.thread_counts() == (recalibrated.prefill, 1)
    assert cache_path() == own_cache


def test_a_corrupt_or_unwritable_cache_only_costs_a_measurement(bundle, own_cache, monkeypatch):
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text("{not json")
    assert Engine.load(bundle).thread_plan.source == "calibrated"
    assert json.loads(own_cache.read_text())  # replaced by a good one
    monkeypatch.setenv("CHATSPOT_EDGE_CACHE", "/proc/no-such-dir")
    assert Engine.load(bundle).thread_plan.source == "calibrated"


def test_cli_thread_options_reach_llama_cpp(bundle, tmp_path):
    img = tmp_path / "i.png"
    _image().save(img)
    r = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", "ask", str(bundle), str(img), "What?",
                        "--max-tokens", "2", "--threads", "2", "--decode-threads", "1", "--timings"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "threads 2 prefill / 1 decode (given)" in r.stderr


def test_persistent_thread_pools_give_the_same_answers(bundle):
    """llama.cpp builds without OpenMP get ggml thread pools attached (else one is started per llama_decode):
    the ctypes path through the CPU backend's registry works and changes no result."""
    from chatspot_edge.runtime.llama import LlamaModel

    gguf = Path(bundle) / "llm-f16.gguf"
    outs = []
    for pools in (False, True):
        m = LlamaModel(gguf, n_ctx=128, threads=2, decode_threads=1, n_seq_max=1, threadpools=pools)
        assert (m._pools is not None) == pools
        pos = m.decode_tokens(m.tokenize("Hello there, what is"), 0, 0)
        toks = []
        for step in range(12):
            if step == 6:
                m.set_threads(prefill=1, decode=2)
            toks.append(m.greedy())
            pos = m.decode_tokens([toks[-1]], 0, pos)
        assert m.thread_counts() == (1, 2)
        if pools:
            assert sorted(m._pools.pools) == [1, 2]
        m.close()
        outs.append(toks)
    assert outs[0] == outs[1]


def test_wait_policy_is_scoped_to_processes_with_torch(tmp_path):
    """The runtime's process keeps OpenMP's default policy; commands that load torch set PASSIVE; a process
    started for the runtime or plain llama.cpp (`runtime_env`) drops what chatspot_edge set, never the user's."""
    code = """
import json, os, sys
import chatspot_edge, chatspot_edge.runtime
from chatspot_edge import openmp
out = {"after_import": os.environ.get("OMP_WAIT_POLICY")}
openmp.share_cores_with_torch()
out["after_share"] = os.environ.get("OMP_WAIT_POLICY")
out["child"] = openmp.runtime_env().get("OMP_WAIT_POLICY")
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"after_import": None, "after_share": "PASSIVE", "child": None}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert json.loads(r.stdout) == {"after_import": "ACTIVE", "after_share": "ACTIVE", "child": "ACTIVE"}


def test_raw_baseline_runs_plain_llama_cpp_in_a_clean_process(bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = tmp_path / "raw.json"
    safe = ["-P"] if sys.version_info >= (3, 11) else []  # the script's folder not first on sys.path
    r = subprocess.run([sys.executable, *safe, str(ROOT / "benchmarks" / "raw_llama.py"), str(Path(bundle) / "llm-f16.gguf"),
                        "--threads", "1,2", "--prompt", "20", "--tokens", "4", "--ctx", "64", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["chatspot_edge_imported"] is False and "OMP_WAIT_POLICY" not in d["env"]
    assert set(d["median"]) == {"1", "2"} and d["best"]["decode_threads"] in (1, 2)
    assert d["best"]["decode_tok_s"] == max(v["decode_tok_s"] for v in d["median"].values())
