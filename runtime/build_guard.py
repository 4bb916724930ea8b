"""The guard: does the llama.cpp library this process is about to load run on this CPU?

A llama.cpp build compiled for an instruction set the CPU lacks does not fail with an error: the process dies with
SIGILL at the first instruction of that set (in a kernel during the first decode, or already while the CPU backend
initialises). So the check never loads the library into this process: a child process loads it and prints
`llama_print_system_info()` (the instruction sets the CPU backend was compiled for; for a portable build, those of
the variant it picked for this CPU), and `chatspot_edge.cpu.missing_instruction_sets` compares them with the CPU's
flags. A mismatch, or a child killed by SIGILL, is a `BuildError`: one line naming the missing instruction sets and
the command that fixes it (exit code 2 from the CLI).

The child's answer is cached per library build (path, size and mtime of every shared library in the folder) under
~/.cache/chatspot-edge/guard, so the check costs one child process per build, then a few `stat` calls; the
comparison with the CPU's flags is redone every time (it is cheap, and the flags may be faked: CHATSPOT_CPUINFO).

    check_llama_build()                      # the llama-cpp-python library the runtime loads
    check_llama_build(Path("native/bin"), fix="make native")   # llama.cpp's tools from `make native`
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from chatspot_edge.cpu import build_instruction_sets, cpu_features, missing_instruction_sets
from chatspot_edge.errors import BuildError

FIX_WHEEL = "make setup"  # rebuilds llama-cpp-python for this CPU (the wheel cache is keyed by its flags)
PROBE_TIMEOUT_S = 120
_PROBE = ("import sys, llama_cpp\n"
          "from chatspot_edge.runtime.llama import init_backend\n"
          "init_backend(llama_cpp)\n"
          "sys.stdout.write(llama_cpp.llama_print_system_info().decode(errors='replace'))\n")
_CHECKED: dict[tuple, str] = {}


def llama_lib_dir() -> Path | None:
    """The folder llama-cpp-python loads libllama from ($LLAMA_CPP_LIB_PATH, else its package's lib/), found
    without importing it (importing loads the library); None when llama-cpp-python is not installed."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _build_id(lib_dir: Path) -> tuple:
    files = sorted(p for p in lib_dir.glob("*") if ".so" in p.name or p.suffix in (".dylib", ".dll"))
    return (str(lib_dir.resolve()),) + tuple((p.name, st.st_size, st.st_mtime_ns)
                                              for p in files for st in [p.stat()])


def _cache_file(build_id: tuple) -> Path:
    root = Path(os.environ.get("CHATSPOT_CACHE_DIR") or Path.home() / ".cache" / "chatspot-edge")
    return root / "guard" / (hashlib.sha256(repr(build_id).encode()).hexdigest()[:24] + ".txt")


def probe_system_info(lib_dir: Path, fix: str = FIX_WHEEL) -> str:
    """`llama_print_system_info()` of the llama.cpp library in `lib_dir`, from a child process (cached).

    Raises BuildError when the child dies of SIGILL (the library does not run on this CPU at all)."""
    build_id = _build_id(lib_dir)
    if build_id in _CHECKED:
        return _CHECKED[build_id]
    cache = _cache_file(build_id)
    try:
        info = cache.read_text()
    except OSError:
        info = ""
    if not info:
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
        # under user-mode emulation (qemu-aarch64 without binfmt_misc) a child of this interpreter must be started
        # through the emulator too: CHATSPOT_CHILD_LAUNCHER names it (chatspot_edge.arm64 sets it for its guests)
        launcher = shlex.split(os.environ.get("CHATSPOT_CHILD_LAUNCHER", ""))
        proc = subprocess.run([*launcher, sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                              timeout=PROBE_TIMEOUT_S)
        if proc.returncode == -signal.SIGILL:
            raise BuildError(f"llama.cpp in {lib_dir} stops with an illegal instruction on this CPU: it was built "
                             f"for another one; rebuild it for this CPU with `{fix}`")
        if proc.returncode != 0 or "CPU :" not in proc.stdout:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"could not read llama.cpp's system info from {lib_dir}: {last}")
        info = proc.stdout.strip()
        try:
            from chatspot_edge.files import atomic_write_text

            atomic_write_text(cache, info)
        except OSError:
            pass  # a read-only home: the check still works, uncached
    _CHECKED[build_id] = info
    return info


def check_llama_build(lib_dir: Path | None = None, fix: str = FIX_WHEEL, what: str = "llama.cpp") -> str | None:
    """Raise BuildError (one line: what is missing, how to fix it) unless the llama.cpp build in `lib_dir`
    (default: the one llama-cpp-python loads) runs on this CPU; returns its system info (None: not installed)."""
    lib_dir = lib_dir or llama_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return None  # not installed: importing llama_cpp reports that itself
    info = probe_system_info(lib_dir, fix)
    missing = missing_instruction_sets(info, cpu_features())
    if missing:
        built = sorted(build_instruction_sets(info))
        raise BuildError(f"{what} in {lib_dir} was built for {', '.join(missing)}, which this CPU lacks (built for: "
                         f"{' '.join(built)}); rebuild it for this CPU with `{fix}`")
    return info
