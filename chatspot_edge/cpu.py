"""This CPU's instruction sets and the llama.cpp (ggml) build options that match them.

Standard library only: `make setup` runs this file with the system Python before the virtual environment has
anything installed (`python3 chatspot_edge/cpu.py cmake-flags`).

- `cpu_features()` reads the CPU's flags (Linux `/proc/cpuinfo` "flags" / "Features", macOS `sysctl`).
- `ggml_cmake_flags(features)` maps them to ggml's CMake options, one `-DGGML_X=ON|OFF` per option, with
  `GGML_NATIVE=OFF` so the choice is explicit and recorded, and AMX always off (ggml's AMX matmul segfaults on
  quantized models: an upstream bug).
- `build_instruction_sets(system_info)` parses `llama_print_system_info()` into the instruction sets a built
  library was compiled for; `missing_instruction_sets()` compares them with this CPU's.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable

# ggml option -> the CPU flags (Linux /proc/cpuinfo names) it needs, all of them. The order is ggml's.
X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    # ggml's AVX512 option compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# Never built, whatever the CPU has.
X86_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# Options that only make sense on top of another one.
X86_REQUIRES = {
    "GGML_AVX2": "GGML_AVX",
    "GGML_FMA": "GGML_AVX",
    "GGML_F16C": "GGML_AVX",
    "GGML_AVX_VNNI": "GGML_AVX2",
    "GGML_AVX512": "GGML_AVX2",
    "GGML_AVX512_VBMI": "GGML_AVX512",
    "GGML_AVX512_VNNI": "GGML_AVX512",
    "GGML_AVX512_BF16": "GGML_AVX512",
}

# llama_print_system_info() names ("AVX512_VNNI = 1") -> the CPU flag(s) that the code compiled with it needs.
SYSTEM_INFO_NEEDS: dict[str, tuple[str, ...]] = {
    "SSE3": ("pni",),
    "SSSE3": ("ssse3",),
    "AVX": ("avx",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX2": ("avx2",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "BMI2": ("bmi2",),
    "AVX512": ("avx512f",),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_INT8": ("amx_int8",),
    "NEON": ("asimd",),
    "ARM_FMA": ("asimd",),
    "FP16_VA": ("asimdhp",),
    "DOTPROD": ("asimddp",),
    "MATMUL_INT8": ("i8mm",),
    "SVE": ("sve",),
    "SME": ("sme",),
}
# macOS sysctl names -> Linux names, for the few flags the mapping uses.
_DARWIN_ALIASES = {
    "sse4.2": "sse4_2", "avx1.0": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
    "avx512bw": "avx512bw", "avx512vbmi": "avx512vbmi", "avx512vnni": "avx512_vnni",
}


# A file in /proc/cpuinfo format that stands for this CPU: to build for another machine from its cpuinfo
# (`CHATSPOT_CPUINFO=their-cpuinfo make setup`) or to test the guard with a CPU that lacks something.
CPUINFO_ENV = "CHATSPOT_CPUINFO"


def cpu_features(cpuinfo: str | None = None) -> set[str]:
    """This CPU's instruction-set flags, in Linux `/proc/cpuinfo` spelling (lower case).

    `cpuinfo`: the text of a /proc/cpuinfo to read instead (default: $CHATSPOT_CPUINFO's file, else /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            with open(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.lower().split())
    if sys.platform == "darwin":
        out: set[str] = set()
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            try:
                text = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            out |= {_DARWIN_ALIASES.get(f.lower(), f.lower()) for f in text.split()}
        if platform.machine() == "arm64":
            out |= {"asimd", "asimdhp", "asimddp"}
        return out
    return set()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def ggml_options(features: Iterable[str]) -> dict[str, bool]:
    """ggml x86 CMake options (name -> on) for a CPU with these flags; AMX always off."""
    have = set(features)
    on = {opt: all(f in have for f in needs) for opt, needs in X86_OPTIONS.items()}
    for opt, base in X86_REQUIRES.items():  # dependency order: X86_OPTIONS lists bases first
        on[opt] = on[opt] and on[base]
    on.update({opt: False for opt in X86_ALWAYS_OFF})
    return on


def ggml_cmake_flags(features: Iterable[str] | None = None, machine: str | None = None) -> list[str]:
    """`-D` options that build ggml's CPU backend for exactly these instruction sets (this CPU's by default).

    Off x86 (ARM), `GGML_NATIVE=ON` is ggml's own feature detection of the build machine, which does not
    include AMX; the cross builds for phones set their targets in the toolchain file instead.
    """
    if not is_x86(machine):
        return ["-DGGML_NATIVE=ON"]
    opts = ggml_options(cpu_features() if features is None else features)
    return ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v else 'OFF'}" for k, v in opts.items()]


def build_instruction_sets(system_info: str) -> set[str]:
    """Instruction sets named `= 1` in `llama_print_system_info()` output (e.g. {"AVX2", "FMA", ...})."""
    return {m.group(1) for m in re.finditer(r"\b([A-Z][A-Z0-9_]*) = 1\b", system_info)} & set(SYSTEM_INFO_NEEDS)


def missing_instruction_sets(system_info: str, features: Iterable[str] | None = None) -> list[str]:
    """The instruction sets the library was compiled for that this CPU lacks (empty: it runs here)."""
    have = set(cpu_features() if features is None else features)
    if not have:  # unknown CPU (no flags readable): nothing to compare against
        return []
    return sorted(s for s in build_instruction_sets(system_info)
                  if not all(f in have for f in SYSTEM_INFO_NEEDS[s]))


# ggml's GGML_CPU_ALL_VARIANTS builds one x86 variant with AMX kernels; a portable wheel ships without it, so an AMX
# machine gets the best AVX-512 variant instead.
AMX_VARIANTS = ("ggml-cpu-sapphirerapids",)


def drop_amx_variants(wheel: str) -> list[str]:
    """Rewrite a llama-cpp-python wheel without its AMX CPU variant(s) (and their RECORD lines); returns what
    was dropped. Standard library only (zipfile), like the rest of this file."""
    import zipfile

    tmp = wheel + ".tmp"
    dropped: list[str] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        drop = {n for n in names if any(f"lib{v}." in n.rsplit("/", 1)[-1] for v in AMX_VARIANTS)}
        for info in src.infolist():
            if info.filename in drop:
                dropped.append(info.filename)
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if l.split(b",")[0].decode() not in drop)
            dst.writestr(info, data)
    os.replace(tmp, wheel)
    return dropped


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "cmake-flags"
    if cmd == "cmake-flags":
        print(" ".join(ggml_cmake_flags()))
    elif cmd == "features":
        print(" ".join(sorted(cpu_features())))
    elif cmd == "drop-amx-variants" and len(argv) == 3:
        print(f"{argv[2]}: dropped {', '.join(drop_amx_variants(argv[2])) or 'nothing'}")
    else:
        print(f"usage: {argv[0]} [cmake-flags|features|drop-amx-variants WHEEL]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
