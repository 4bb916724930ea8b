"""The llama.cpp build for the CPU it runs on: CPU flags -> ggml options (chatspot_edge/cpu.py, what `make setup` and
`make native` build with), and the guard that refuses a library built for instruction sets this CPU lacks
(runtime/build_guard.py): one line, exit code 2, the missing set and the fixing command named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatspot_edge import cpu
from chatspot_edge.errors import BuildError

BASE = "fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt"
CPUS = {
    # this project's machines: a Zen 3 (no AVX-512), a Zen 4 style EPYC without AVX-VNNI, a Sapphire Rapids with AMX
    "zen3": BASE + " avx f16c fma bmi1 bmi2 avx2",
    "avx512_no_avx_vnni": BASE + " avx f16c fma bmi2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi "
                                 "avx512_vnni avx512_bf16",
    "sapphire_rapids": BASE + " avx f16c fma bmi2 avx2 avx_vnni avx512f avx512dq avx512cd avx512bw avx512vl "
                              "avx512vbmi avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8",
    "sse_only": BASE,
}


def _on(name: str) -> set[str]:
    return {k for k, v in cpu.ggml_options(CPUS[name].split()).items() if v}


def test_cpu_without_avx512():
    assert _on("zen3") == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}


def test_cpu_without_avx_vnni():
    on = _on("avx512_no_avx_vnni")
    assert "GGML_AVX_VNNI" not in on  # the SIGILL: AVX-VNNI forced on a CPU that has AVX512-VNNI only
    assert {"GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX2"} <= on


def test_cpu_with_amx_gets_no_amx_kernels():
    opts = cpu.ggml_options(CPUS["sapphire_rapids"].split())
    assert opts["GGML_AVX_VNNI"] and opts["GGML_AVX512_BF16"]
    assert not any(opts[k] for k in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))


def test_options_need_their_base_and_every_flag():
    assert _on("sse_only") == {"GGML_SSE42"}
    # AVX-512 in ggml means F+CD+VL+DQ+BW: a CPU with avx512f alone (Knights Landing) gets none of it
    knl = cpu.ggml_options((CPUS["zen3"] + " avx512f avx512cd avx512_vnni").split())
    assert not knl["GGML_AVX512"] and not knl["GGML_AVX512_VNNI"]
    # avx_vnni without avx2 (a hypervisor that hides AVX2) is not built either
    assert not cpu.ggml_options((BASE + " avx avx_vnni").split())["GGML_AVX_VNNI"]


def test_cmake_flags_are_explicit():
    flags = cpu.ggml_cmake_flags(CPUS["zen3"].split(), machine="x86_64")
    assert flags[0] == "-DGGML_NATIVE=OFF"
    names = [f.split("=")[0][2:] for f in flags[1:]]
    assert set(names) == set(cpu.X86_OPTIONS) | set(cpu.X86_ALWAYS_OFF)  # every option said, ON or OFF
    assert "-DGGML_AVX512=OFF" in flags and "-DGGML_AVX2=ON" in flags and "-DGGML_AMX_INT8=OFF" in flags
    assert cpu.ggml_cmake_flags([], machine="aarch64") == ["-DGGML_NATIVE=ON"]


def test_makefile_reads_a_cpuinfo_file(tmp_path):
    """`make setup` runs `python3 chatspot_edge/cpu.py cmake-flags` with the system Python: stdlib only, and
    CHATSPOT_CPUINFO stands for another machine's /proc/cpuinfo."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {CPUS['avx512_no_avx_vnni']}\n")
    script = Path(cpu.__file__)
    env = {"PATH": os.environ.get("PATH", ""), cpu.CPUINFO_ENV: str(info)}
    out = subprocess.run([sys.executable, "-S", str(script), "cmake-flags"], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    if cpu.is_x86():
        assert "-DGGML_AVX512_VNNI=ON" in out and "-DGGML_AVX_VNNI=OFF" in out and "-DGGML_AMX_INT8=OFF" in out


SYSTEM_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 |"


def test_system_info_against_cpu_flags():
    assert cpu.build_instruction_sets(SYSTEM_INFO) == {"SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA"}
    assert cpu.missing_instruction_sets(SYSTEM_INFO, CPUS["avx512_no_avx_vnni"].split()) == ["AVX_VNNI"]
    assert cpu.missing_instruction_sets(SYSTEM_INFO, CPUS["sapphire_rapids"].split()) == []
    assert cpu.missing_instruction_sets(SYSTEM_INFO, CPUS["sse_only"].split()) == ["AVX", "AVX2", "AVX_VNNI", "F16C",
                                                                                   "FMA"]
    assert cpu.missing_instruction_sets("CPU : AVX512 = 1 | AMX_INT8 = 1 |", CPUS["zen3"].split()) == ["AMX_INT8",
                                                                                                       "AVX512"]


# -- the guard ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def cpu_without_avx2(tmp_path, monkeypatch):
    """This CPU's flags minus AVX2 and FMA, as a cpuinfo file in CHATSPOT_CPUINFO (inherited by child processes)."""
    if not cpu.is_x86():
        pytest.skip("x86 instruction sets")
    flags = sorted(cpu.cpu_features() - {"avx2", "fma"})
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: " + " ".join(flags) + "\n")
    monkeypatch.setenv(cpu.CPUINFO_ENV, str(info))
    return info


@pytest.mark.llama
def test_guard_passes_on_this_cpu():
    from chatspot_edge.runtime.build_guard import check_llama_build

    info = check_llama_build()
    assert "CPU :" in info and not cpu.missing_instruction_sets(info)


@pytest.mark.llama
def test_guard_names_the_missing_set_and_the_fix(cpu_without_avx2):
    from chatspot_edge.runtime.build_guard import check_llama_build

    with pytest.raises(BuildError) as e:
        check_llama_build()
    msg = str(e.value)
    assert "AVX2" in msg and "FMA" in msg and "`make setup`" in msg and "\n" not in msg


@pytest.mark.llama
@pytest.mark.parametrize("argv", [
    ["ask", "{bundle}", "{image}", "What is this?", "--box", "2,2,20,20"],
    ["eval", "{bundle}", "--data", "{data}", "--out", "{tmp}/e.json", "--limit", "1"],
    ["quantize", "{bundle}", "--llm", "q8_0"],
    ["bench", "{bundle}", "--out", "{tmp}/b.json", "--repeats", "1"],
])
def test_cli_refuses_with_exit_2(argv, cpu_without_avx2, guard_bundle, tmp_path):
    bundle, image, data = guard_bundle
    args = [a.format(bundle=bundle, image=image, data=data, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in bundle.iterdir())
    proc = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "AVX2" in lines[0] and "make setup" in lines[0]
    assert sorted(p.name for p in bundle.iterdir()) == before  # nothing written, nothing half-done


@pytest.mark.llama
def test_doctor_reports_and_fails(cpu_without_avx2, guard_bundle):
    proc = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", "doctor", str(guard_bundle[0])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "DOES NOT RUN HERE: needs AVX2, FMA" in proc.stdout and "`make setup`" in proc.stdout
    assert "not tried: llama.cpp does not run here" in proc.stdout


@pytest.mark.llama
def test_doctor_on_this_machine(guard_bundle):
    proc = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", "doctor", str(guard_bundle[0])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "runs here: yes" in out and "LLM F32 (default)" in out and "vision fp32 (default)" in out
    assert out.count("runs here (") >= 2 and out.rstrip().endswith("OK: everything above runs here")


@pytest.mark.llama
def test_a_library_that_dies_of_sigill(tmp_path):
    """A library that executes an illegal instruction while loading (what a build for another CPU does) kills
    the probe process, not this one: a BuildError with the fix."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not cpu.is_x86():
        pytest.skip("needs a C compiler, x86 (ud2)")
    from chatspot_edge.runtime.build_guard import probe_system_info

    src = tmp_path / "bad.c"
    src.write_text("__attribute__((constructor)) static void init(void) { __builtin_trap(); }\n")
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("libllama.so", "libggml.so"):
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib / name), str(src)], check=True)
    with pytest.raises(BuildError, match="illegal instruction.*`make setup`"):
        probe_system_info(lib)


@pytest.fixture(scope="module")
def guard_bundle(tmp_path_factory):
    """(bundle, image, data folder): a tiny bundle and a one-record SpotWorld test split."""
    from chatspot_edge.data import generate
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset

    d = tmp_path_factory.mktemp("guard")
    model, tok = build_preset("tiny", seed=0)
    bundle = export_bundle(save_checkpoint(model, tok, d / "ck"), d / "bundle", llm_dtype="f32")
    generate(d / "sw", seed=0, n_train=1, n_test=1, workers=1)
    image = next((d / "sw" / "images").glob("*.png"))
    return Path(bundle), image, d / "sw"
