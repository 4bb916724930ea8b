"""OpenMP wait policy, scoped to the processes that need it.

torch ships its own OpenMP runtime and llama.cpp links the system's. With the default wait policy, a pool's
idle threads spin for a while after each parallel region; when torch and llama.cpp live in ONE process their
spinning threads starve each other on a small machine (measured 100-500x slowdowns of llama.cpp decode and
torch convolutions on 2 cores). `OMP_WAIT_POLICY=PASSIVE` stops that, at the price of a thread wake-up at
every barrier: on a 2-thread llama.cpp decode step that is a third of the speed (Q4_0 smol: 37 tok/s instead of
129 on a 2-core Zen 3). So PASSIVE is set only in processes that load torch (training, checkpoint evaluation,
export checks, the quantization quality report, the pipeline), never in the runtime's (`ask`, `chat`, `serve`,
the benchmark's workers): those load llama.cpp and onnxruntime only, and onnxruntime's pool does not spin
(`runtime.vision.cpu_session` turns spinning off).

OpenMP reads the variable once, when its library loads: `share_cores_with_torch()` must run before torch or
llama.cpp is imported. A value the user set in the environment always wins.
"""

from __future__ import annotations

import os
import sys
import warnings

WAIT_POLICY = "OMP_WAIT_POLICY"
_set_here: dict[str, str] = {}  # variables this module set (not the user), for `runtime_env`


def share_cores_with_torch() -> None:
    """Make this process's OpenMP pools wait passively (unless the user chose a policy): for processes that
    run torch and llama.cpp (or torch alone, as the training does). Call before either library is imported."""
    if WAIT_POLICY in os.environ:
        return
    late = [m for m in ("torch", "llama_cpp") if m in sys.modules]
    if late:
        warnings.warn(f"{WAIT_POLICY}=PASSIVE set after {' and '.join(late)} loaded: their OpenMP pools keep the "
                      f"policy they started with", RuntimeWarning, stacklevel=2)
    os.environ[WAIT_POLICY] = "PASSIVE"
    _set_here[WAIT_POLICY] = "PASSIVE"


def runtime_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that runs the runtime or plain llama.cpp: this process's environment
    without what `share_cores_with_torch` added (the user's own settings are kept)."""
    out = dict(os.environ if env is None else env)
    for key, value in _set_here.items():
        if out.get(key) == value:
            del out[key]
    return out


def torch_loaded_without_policy() -> bool:
    """True when torch is loaded in this process and no wait policy is set: loading llama.cpp now makes two
    spinning OpenMP pools share the cores."""
    return "torch" in sys.modules and WAIT_POLICY not in os.environ
