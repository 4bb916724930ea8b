"""64-bit ARM: cross-build llama.cpp for aarch64 and run the Python runtime under qemu-aarch64 on this x86 machine.

Everything comes from Debian's and PyPI's packages, unpacked into a cache outside the clone (nothing is installed
into the system, no root needed), each part in a folder named by a hash of what it depends on:

    ~/.cache/chatspot-edge/arm64/
      apt/                       private apt state (package lists for amd64 + arm64 of this machine's Debian sources)
      toolchain-<key>/           gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, binutils, the arm64 cross libc (dpkg -x)
      userland-<key>/            arm64 Python 3.11 + its shared libraries (Debian 12 arm64 packages, dpkg -x) and
                                 qemu-aarch64 (Debian 13's qemu-user); run as `qemu-aarch64 -L userland-<key> ...`
      site-<key>/                arm64 wheels of the runtime's dependencies, the versions the x86 .venv has
                                 (numpy, pillow, onnxruntime, typer, jinja2, ...) + llama-cpp-python's Python package
      llama-<key>/bin/           libllama / libggml* (.so) and llama-bench / llama-quantize / llama-imatrix for aarch64,
                                 cross-built from the top-level CMakeLists.txt (the pinned sdist, one fetch for all)

`make native-arm64` runs `python -m chatspot_edge.arm64 setup`; `Arm64.locate()` finds the same folders again
(the tests, `python -m chatspot_edge.arm64 run|tool|info`). Timings under emulation say nothing about a phone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chatspot_edge.files import atomic_dir  # build into a temporary sibling, renamed into place on success

REPO = Path(__file__).resolve().parent.parent
# the project's cache (as cmake/LlamaSource.cmake and the Makefile's CACHE_ROOT): CHATSPOT_CACHE_DIR, else
# $XDG_CACHE_HOME/chatspot-edge, else ~/.cache/chatspot-edge
CACHE = Path(os.environ.get("CHATSPOT_CACHE_DIR")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatspot-edge") / "arm64"
TOOLCHAIN_FILE = REPO / "cmake" / "aarch64-linux-gnu.cmake"

PIN_FILE = REPO / "cmake" / "llama-cpp-python.txt"  # the one pin of the llama-cpp-python sdist (version + sha256)
_pin = re.search(r"^llama-cpp-python==(\S+) +--hash=sha256:([0-9a-f]{64})", PIN_FILE.read_text(), re.M)
LLAMA_CPP_VERSION, LLAMA_CPP_SDIST_SHA256 = _pin.group(1), _pin.group(2)

# The phone target (every Android core since Cortex-A55/A75 has dotprod + fp16) and the fallback for older cores.
ARCHES = {"armv8.2-a+dotprod+fp16": "cortex-a76", "armv8-a": "cortex-a53"}  # -march -> a qemu CPU that runs it
DEFAULT_ARCH = "armv8.2-a+dotprod+fp16"

# Debian bookworm's cross toolchain (amd64 packages). The closure of g++-aarch64-linux-gnu minus what every Debian
# system has (libc6, libgcc-s1, libstdc++6, zlib1g, libzstd1, libgmp10: required / build-essential packages):
TOOLCHAIN_PACKAGES = (
    "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "cpp-aarch64-linux-gnu",
    "gcc-12-aarch64-linux-gnu", "g++-12-aarch64-linux-gnu", "cpp-12-aarch64-linux-gnu",
    "gcc-12-aarch64-linux-gnu-base", "gcc-12-cross-base", "binutils-aarch64-linux-gnu", "binutils-common",
    "libbinutils", "libjansson4", "libisl23", "libmpc3", "libmpfr6", "libcc1-0",
    "libc6-arm64-cross", "libc6-dev-arm64-cross", "linux-libc-dev-arm64-cross",
    "libgcc-12-dev-arm64-cross", "libgcc-s1-arm64-cross", "libstdc++-12-dev-arm64-cross", "libstdc++6-arm64-cross",
    "libgomp1-arm64-cross", "libatomic1-arm64-cross", "libasan8-arm64-cross", "liblsan0-arm64-cross",
    "libtsan2-arm64-cross", "libubsan1-arm64-cross", "libhwasan0-arm64-cross", "libitm1-arm64-cross",
)
# arm64 packages for the Python user land (python3.11-minimal + libpython3.11-stdlib and their shared libraries;
# dpkg, tar and perl, which the maintainer scripts want, and the arch-independent data packages (media-types,
# readline-common, libtirpc-common: config files the runtime never reads) are left out: nothing is configured,
# only unpacked).
USERLAND_PACKAGES = (
    "libc6", "libgcc-s1", "gcc-12-base", "libstdc++6", "libgomp1",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libncursesw6",
    "libtinfo6", "libreadline8", "libuuid1", "libdb5.3", "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libkrb5-3",
    "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1", "libcrypt1",
)
# qemu-aarch64 (amd64, static-pie: runs from wherever it is unpacked) from Debian 13 (trixie): bookworm's qemu 7.2
# shows the guest the HOST's /proc/cpuinfo, and onnxruntime 1.31's CPU detection (pytorch/cpuinfo) crashes
# (SIGSEGV) on x86 text there; qemu 10 shows the emulated core's (e.g. Cortex-A76: "Features: ... asimdhp ...
# asimddp"), as a phone's kernel would.
QEMU_SUITE = "trixie"
QEMU_PACKAGE = "qemu-user"
ARM64_PYTHON = "3.11"  # bookworm's python3.11; the wheels are chosen for cp311

# Top-level distributions the runtime path (`chatspot-edge ask`) imports; their requirements are followed.
RUNTIME_DISTRIBUTIONS = ("numpy", "pillow", "onnxruntime", "typer", "jinja2", "diskcache", "typing-extensions")
ARM64_WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64")

# What the top-level CMakeLists.txt builds (its options: shared libraries, nothing downloaded; the toolchain file
# adds the target's instruction sets): the runtime's libraries and the tools for on-target profiling.
LLAMA_TOOLS = ("llama-bench", "llama-quantize", "llama-imatrix")


class Arm64Error(RuntimeError):
    """A step of the arm64 setup failed (the message says which and what to do)."""


def log(msg: str) -> None:
    print(f"[arm64] {msg}", file=sys.stderr, flush=True)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        raise Arm64Error(f"{cmd[0]} not found (needs Debian's apt / dpkg)") from None
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or b"")[-2000:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-2000:]
        raise Arm64Error(f"`{' '.join(cmd[:6])} ...` failed with exit code {e.returncode}"
                         + (f": {tail.decode() if isinstance(tail, bytes) else tail}" if tail else "")) from None


# -- Debian packages (private apt state: the system's package lists and dpkg database are not touched) ---------


def _apt_options(state: Path) -> list[str]:
    opts = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "APT::Architectures::=amd64", "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root"]
    if (state / "sources.list").exists():  # another suite than the system's (the qemu from trixie)
        opts += ["-o", f"Dir::Etc::SourceList={state / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent"]
    return opts


def _apt_state(suite: str | None) -> Path:
    """Private apt state for the system's own sources (suite None) or for Debian `suite` (its main archive,
    signed by the keys of the system's debian-archive-keyring)."""
    state = CACHE / ("apt" if suite is None else f"apt-{suite}")
    if suite is not None and not (state / "sources.list").exists():
        state.mkdir(parents=True, exist_ok=True)
        mirror = "http://deb.debian.org/debian"
        for src in Path("/etc/apt").glob("sources.list.d/*.sources"):  # follow the system's mirror if it names one
            m = re.search(r"^URIs:\s*(\S+/debian)\s*$", src.read_text(), re.M)
            if m:
                mirror = m.group(1)
                break
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (state / "sources.list").write_text(f"deb [signed-by={keyring}] {mirror} {suite} main\n")
    return state


def _apt_update(state: Path) -> None:
    if (state / "lists" / ".complete").exists():
        return
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    log(f"apt-get update (private lists in {state})")
    _run(["apt-get", "-q", *_apt_options(state), "update"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (state / "lists" / ".complete").touch()


def _apt_download(state: Path, packages: list[str], dest: Path) -> dict[str, str]:
    """Download .debs into `dest` (no dependency resolution: the lists above are explicit); {package: version}."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "-q", *_apt_options(state), "download", *packages], cwd=dest,
         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    versions = {}
    for deb in sorted(dest.glob("*.deb")):
        name, version, _ = deb.name.split("_", 2)
        versions[name] = version.replace("%3a", ":")
    return versions


def _unpack_debs(debs: Path, root: Path) -> None:
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])


def _apt_fetch_unpack(packages: list[str], root: Path, suite: str | None = None) -> dict[str, str]:
    state = _apt_state(suite)
    _apt_update(state)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        try:
            versions = _apt_download(state, packages, Path(tmp))
        except Arm64Error:  # lists older than the archive (a version was superseded): refresh once, retry
            (state / "lists" / ".complete").unlink(missing_ok=True)
            _apt_update(state)
            versions = _apt_download(state, packages, Path(tmp))
        _unpack_debs(Path(tmp), root)
    return versions


def toolchain_dir() -> Path:
    return CACHE / f"toolchain-{_key('bookworm', TOOLCHAIN_PACKAGES)}"


def ensure_toolchain() -> Path:
    """Debian's aarch64 cross gcc / g++ / binutils unpacked (relocatable: gcc finds its parts relative to itself;
    the sysroot is this folder, so the cross libc's linker scripts resolve inside it)."""
    final = toolchain_dir()
    if (final / "packages.json").exists():
        return final
    log(f"cross toolchain -> {final}")
    with atomic_dir(final) as tmp:
        versions = _apt_fetch_unpack(list(TOOLCHAIN_PACKAGES), tmp)
        (tmp / "packages.json").write_text(json.dumps(versions, indent=1))
    return final


def toolchain_env(root: Path) -> dict[str, str]:
    """Environment for cmake / the compiler: the cross binutils load their private libbfd / libopcodes from here."""
    env = dict(os.environ)
    libdir = str(root / "usr" / "lib" / "x86_64-linux-gnu")
    env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["CHATSPOT_ARM64_TOOLCHAIN"] = str(root)
    return env


def userland_dir() -> Path:
    return CACHE / f"userland-{_key('bookworm', USERLAND_PACKAGES, QEMU_SUITE, QEMU_PACKAGE)}"


def ensure_userland() -> Path:
    """The arm64 Python user land + qemu-aarch64."""
    final = userland_dir()
    if (final / "packages.json").exists():
        return final
    log(f"arm64 Python user land + qemu -> {final}")
    with atomic_dir(final) as tmp:
        versions = _apt_fetch_unpack([f"{p}:arm64" for p in USERLAND_PACKAGES], tmp)
        qemu_root = tmp / "qemu"
        versions.update(_apt_fetch_unpack([QEMU_PACKAGE], qemu_root, QEMU_SUITE))
        # keep only the aarch64 emulator (the package holds ~30 architectures)
        for f in (qemu_root / "usr" / "bin").iterdir():
            if f.name != "qemu-aarch64":
                f.unlink()
        shutil.rmtree(qemu_root / "usr" / "share", ignore_errors=True)
        if not (qemu_root / "usr" / "bin" / "qemu-aarch64").exists():
            raise Arm64Error(f"qemu-aarch64 missing from {QEMU_SUITE}'s {QEMU_PACKAGE}")
        if not (tmp / "usr" / "bin" / f"python{ARM64_PYTHON}").exists():
            raise Arm64Error(f"python{ARM64_PYTHON} missing from the unpacked arm64 packages")
        (tmp / "packages.json").write_text(json.dumps(versions, indent=1))
    return final


# -- llama-cpp-python's source: the same verified sdist `make setup` / `make native` use ------------------------------


def sdist_archive(python: str = sys.executable) -> Path:
    """The pinned sdist (.tar.gz), fetched through pip and checked against its sha256 by cmake/LlamaSource.cmake
    (cached in ~/.cache/chatspot-edge/sdist/): one fetch for the x86 wheel, `make native` and this."""
    r = _run(["cmake", f"-DCHATSPOT_PYTHON={python}", f"-DCHATSPOT_CACHE_DIR={CACHE.parent}", "-P",
              str(REPO / "cmake" / "LlamaSource.cmake")], capture_output=True, text=True)
    path = Path(r.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise Arm64Error(f"cmake/LlamaSource.cmake printed {path}, not a file")
    return path


# -- the cross build -------------------------------------------------------------------------------------------


def _cmake_args(arch: str) -> list[str]:
    return ["-DCMAKE_BUILD_TYPE=Release", f"-DCHATSPOT_ARM64_ARCH={arch}"]


def _build_inputs() -> list[str]:
    """The files whose text decides what the cross build makes (besides the toolchain's packages)."""
    names = ("CMakeLists.txt", "cmake/LlamaSource.cmake", "cmake/llama-cpp-python.txt", "cmake/aarch64-linux-gnu.cmake")
    return [(REPO / n).read_text() for n in names]


def build_dir(arch: str = DEFAULT_ARCH) -> Path:
    return CACHE / f"llama-{_key(toolchain_dir().name, _cmake_args(arch), _build_inputs())}"


def ensure_llama(arch: str = DEFAULT_ARCH, jobs: int | None = None, python: str = sys.executable) -> Path:
    """Cross-build the top-level CMakeLists.txt (libllama / libggml* and llama-bench / llama-quantize /
    llama-imatrix, from the pinned sdist) for `arch`; the results, side by side, in llama-<key>/bin."""
    if arch not in ARCHES:
        raise Arm64Error(f"unknown arch {arch!r}: one of {', '.join(ARCHES)}")
    final = build_dir(arch)
    if (final / "build.json").exists():
        return final
    tc = ensure_toolchain()
    env = toolchain_env(tc)
    jobs = jobs or os.cpu_count() or 2
    log(f"cross-building llama.cpp {LLAMA_CPP_VERSION} for aarch64 ({arch}, {jobs} jobs) -> {final}")
    with atomic_dir(final) as out, tempfile.TemporaryDirectory(dir=CACHE) as bdir:
        t0 = time.monotonic()
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(REPO), "-B", bdir, *gen, f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN_FILE}",
              f"-DCHATSPOT_PYTHON={python}", f"-DCHATSPOT_CACHE_DIR={CACHE.parent}", *_cmake_args(arch)],
             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t1 = time.monotonic()
        _run(["cmake", "--build", bdir, "-j", str(jobs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t2 = time.monotonic()
        # tools and libraries side by side, found through $ORIGIN (libllama.so -> .so.0 -> .so.0.5.0 links kept)
        shutil.copytree(Path(bdir) / "bin", out / "bin", symlinks=True)
        missing = [f for f in (*LLAMA_TOOLS, "libllama.so", "libggml.so") if not (out / "bin" / f).exists()]
        if missing:
            raise Arm64Error(f"the cross build did not make {', '.join(missing)}")
        info = {"llama_cpp_python": LLAMA_CPP_VERSION, "sdist_sha256": LLAMA_CPP_SDIST_SHA256, "arch": arch,
                "cmake_args": _cmake_args(arch), "toolchain": json.loads((tc / "packages.json").read_text()),
                "configure_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1), "jobs": jobs}
        (out / "build.json").write_text(json.dumps(info, indent=1))
    log(f"built in {info['configure_s'] + info['build_s']:.0f} s (configure {info['configure_s']} s)")
    return final


# -- arm64 wheels ------------------------------------------------------------------------------------------------


def runtime_requirements() -> list[str]:
    """`name==version` of the runtime's distributions and everything they require (extras left out), at the
    versions installed in THIS Python (the x86 .venv), so both sides run the same library versions."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    env.update(platform_machine="aarch64", python_version=ARM64_PYTHON, extra="")
    seen: dict[str, str] = {}
    todo = list(RUNTIME_DISTRIBUTIONS)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            seen[key] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise Arm64Error(f"{name} is not installed in {sys.executable}: run `make setup` first") from None
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return sorted(f"{k}=={v}" for k, v in seen.items())


def site_dir(requirements: list[str]) -> Path:
    return CACHE / f"site-{_key(requirements, ARM64_PYTHON, ARM64_WHEEL_PLATFORMS, LLAMA_CPP_SDIST_SHA256)}"


def ensure_site(python: str = sys.executable) -> Path:
    """arm64 wheels (PyPI) installed into a folder for PYTHONPATH, plus llama-cpp-python's `llama_cpp` package
    from the sdist (pure Python over ctypes; its library comes from LLAMA_CPP_LIB_PATH)."""
    reqs = runtime_requirements()
    final = site_dir(reqs)
    if (final / "requirements.txt").exists():
        return final
    log(f"arm64 wheels ({len(reqs)} distributions) -> {final}")
    archive = sdist_archive(python)
    platforms = [a for p in ARM64_WHEEL_PLATFORMS for a in ("--platform", p)]
    with atomic_dir(final) as out:
        _run([python, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", *platforms,
              "--python-version", ARM64_PYTHON, "--implementation", "cp", "--abi", f"cp{ARM64_PYTHON.replace('.', '')}",
              "--target", str(out), *reqs], stderr=subprocess.PIPE)
        prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/"
        with tarfile.open(archive) as tar:  # only the Python package (llama_cpp/) of the sdist
            members = [m for m in tar.getmembers() if m.name.startswith(prefix + "llama_cpp/")]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
        if not (out / "llama_cpp" / "__init__.py").exists():
            raise Arm64Error(f"{archive}: no llama_cpp/ package inside")
        shutil.rmtree(out / "bin", ignore_errors=True)  # console scripts for x86 paths: not used
        (out / "requirements.txt").write_text("\n".join(reqs) + f"\nllama-cpp-python=={LLAMA_CPP_VERSION}  # sdist, "
                                              "Python package only\n")
    return final


# -- running arm64 programs under qemu ----------------------------------------------------------------------------


def source_tree(dest: Path) -> Path:
    """A folder where `import chatspot_edge...` finds this checkout: pyproject.toml's package-dir mapping
    (`chatspot_edge.runtime` = runtime/, ...) as symlinks. Returns the folder to put on PYTHONPATH."""
    import tomllib

    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dest / "chatspot_edge"
    pkg.mkdir(parents=True, exist_ok=True)
    top = REPO / mapping["chatspot_edge"]
    subs = {name.split(".", 1)[1]: REPO / path for name, path in mapping.items() if "." in name}
    for f in top.iterdir():
        if f.name not in subs and f.name != "__pycache__" and not (pkg / f.name).exists():
            (pkg / f.name).symlink_to(f)
    for sub, path in subs.items():
        if not (pkg / sub).exists():
            (pkg / sub).symlink_to(path, target_is_directory=True)
    return dest


@dataclass
class Arm64:
    """The assembled pieces; `python(args)` / `tool(name, args)` give argv lists that run under qemu-aarch64."""

    userland: Path
    site: Path
    llama: Path
    arch: str = DEFAULT_ARCH

    @classmethod
    def locate(cls, arch: str = DEFAULT_ARCH, python: str = sys.executable) -> "Arm64 | None":
        """The built pieces for `arch`, or None when `make native-arm64` has not built them (nothing is built)."""
        try:
            parts = cls(userland_dir(), site_dir(runtime_requirements()), build_dir(arch), arch)
        except Arm64Error:
            return None
        ok = ((parts.userland / "packages.json").exists() and (parts.site / "requirements.txt").exists()
              and (parts.llama / "build.json").exists())
        return parts if ok else None

    @classmethod
    def ensure(cls, arch: str = DEFAULT_ARCH, python: str = sys.executable) -> "Arm64":
        llama = ensure_llama(arch)
        return cls(ensure_userland(), ensure_site(python), llama, arch)

    @property
    def qemu(self) -> Path:
        return self.userland / "qemu" / "usr" / "bin" / "qemu-aarch64"

    def env(self, src: Path | None = None, cpu: str | None = None) -> dict[str, str]:
        """Environment for a guest process: qemu's CPU model and sysroot, the guest's PYTHONPATH and library path.
        `cpu` (default: the oldest core the build targets, see ARCHES) is a qemu CPU model."""
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV", "QEMU_", "LLAMA_CPP_LIB"))}
        path = [str(self.site)] + ([str(src)] if src else [])
        keep.update({"QEMU_CPU": cpu or ARCHES[self.arch], "QEMU_LD_PREFIX": str(self.userland),
                     "PYTHONPATH": os.pathsep.join(path), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                     # the working directory (a checkout holds a chatspot_edge/ without its mapped subpackages)
                     # must not shadow the source tree on PYTHONPATH
                     "PYTHONSAFEPATH": "1",
                     "LLAMA_CPP_LIB_PATH": str(self.llama / "bin"), "LD_LIBRARY_PATH": str(self.llama / "bin"),
                     # the guest's own child processes (the build guard's probe) go through qemu as well
                     "CHATSPOT_CHILD_LAUNCHER": str(self.qemu)})
        return keep

    def python(self, args: list[str]) -> list[str]:
        return [str(self.qemu), str(self.userland / "usr" / "bin" / f"python{ARM64_PYTHON}"), *args]

    def tool(self, name: str, args: list[str]) -> list[str]:
        return [str(self.qemu), str(self.llama / "bin" / name), *args]

    def info(self) -> dict:
        return {"arch": self.arch, "qemu_cpu": ARCHES[self.arch], "userland": str(self.userland),
                "site": str(self.site), "llama": str(self.llama),
                "build": json.loads((self.llama / "build.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatspot_edge.arm64", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="toolchain + cross build + arm64 user land + wheels (cached; what "
                                     "`make native-arm64` runs)")
    s.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHES))
    s.add_argument("--jobs", type=int, default=None)
    i = sub.add_parser("info", help="print where the built pieces are (JSON); exit 1 when not built")
    i.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHES))
    r = sub.add_parser("run", help="run the arm64 Python under qemu with this checkout importable: "
                                   "`run -m chatspot_edge.cli ask BUNDLE IMAGE QUESTION --box ...`")
    r.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHES))
    r.add_argument("--cpu", default=None, help="qemu CPU model (default: the arch's oldest target core)")
    r.add_argument("args", nargs=argparse.REMAINDER)
    t = sub.add_parser("tool", help="run an aarch64 llama.cpp tool under qemu: `tool llama-bench -m X.gguf ...`")
    t.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHES))
    t.add_argument("--cpu", default=None)
    t.add_argument("name", choices=list(LLAMA_TOOLS))
    t.add_argument("args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("run", "tool") and not {"-h", "--help"} & set(argv[1:2]):
        # the sub-command's own options first; everything after them goes to the guest program verbatim
        a = argparse.Namespace(cmd=argv[0], arch=DEFAULT_ARCH, cpu=None, name=None)
        rest = argv[1:]
        while len(rest) >= 2 and rest[0] in ("--arch", "--cpu"):
            setattr(a, rest[0][2:], rest[1])
            rest = rest[2:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        if a.cmd == "tool":
            if not rest or rest[0] not in LLAMA_TOOLS:
                p.error(f"tool: one of {', '.join(LLAMA_TOOLS)}")
            a.name, rest = rest[0], rest[1:]
        if a.arch not in ARCHES:
            p.error(f"--arch: one of {', '.join(ARCHES)}")
        a.args = rest
    else:
        a = p.parse_args(argv)
    try:
        if a.cmd == "setup":
            ensure_llama(a.arch, a.jobs)
            parts = Arm64.ensure(a.arch)
            print(json.dumps(parts.info(), indent=1))
            return 0
        parts = Arm64.locate(a.arch)
        if parts is None:
            print(f"error: the aarch64 pieces for {a.arch} are not built: run `make native-arm64`"
                  + ("" if a.arch == DEFAULT_ARCH else f" ARM64_ARCH={a.arch}"), file=sys.stderr)
            return 1 if a.cmd == "info" else 2
        if a.cmd == "info":
            print(json.dumps(parts.info(), indent=1))
            return 0
        if a.cmd == "run":
            with tempfile.TemporaryDirectory() as src:
                return subprocess.call(parts.python(a.args), env=parts.env(source_tree(Path(src)), a.cpu))
        return subprocess.call(parts.tool(a.name, a.args), env=parts.env(cpu=a.cpu))
    except Arm64Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
