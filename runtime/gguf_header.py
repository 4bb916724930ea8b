"""A GGUF header reader: metadata scalars and the tensor table, without touching the tensor data.

`gguf.GGUFReader` builds a numpy view per tokenizer entry (seconds for a 49k vocabulary); loading a bundle
or comparing quantized files only needs the header. Array values (the vocabulary, merges) are skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# GGUF value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, (8 string), (9 array), uint64,
# int64, float64
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFHeader:
    version: int
    kv: dict[str, Any] = field(default_factory=dict)  # scalars and strings; arrays are left out
    tensors: list[dict[str, Any]] = field(default_factory=list)  # name, type, shape (ggml order), params, bytes


def read_gguf_header(path: str | Path, tensors: bool = True, only: tuple[str, ...] = ()) -> GGUFHeader:
    """Parse the header of a GGUF v2+ file. ValueError on anything that is not one. With `only`, stop as soon
    as those metadata keys are read (no tensor table)."""
    with open(path, "rb") as f:
        buf = memoryview(f.read(1 << 20))
        pos = 0

        def need(n: int) -> None:
            nonlocal buf
            if pos + n > len(buf):  # the header is larger than the first read: read more
                f.seek(0)
                buf = memoryview(f.read(max(2 * len(buf), pos + n + (1 << 20))))
                if pos + n > len(buf):
                    raise ValueError(f"{path}: truncated GGUF header")

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize("<" + fmt)
            need(size)
            v = struct.unpack_from("<" + fmt, buf, pos)
            pos += size
            return v if len(v) > 1 else v[0]

        def string() -> str:
            nonlocal pos
            n = take("Q")
            need(n)
            s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def value(vtype: int, keep: bool) -> Any:
            nonlocal pos
            if vtype in _SCALAR:
                return take(_SCALAR[vtype])
            if vtype == STRING:
                return string()
            if vtype == ARRAY:
                etype, count = take("IQ")
                if etype in _SCALAR:
                    size = struct.calcsize("<" + _SCALAR[etype]) * count
                    need(size)
                    pos += size
                else:
                    for _ in range(count):
                        value(etype, False)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        magic = bytes(buf[:4]) if len(buf) >= 4 else b""
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        pos = 4
        version, n_tensors, n_kv = take("IQQ")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        header = GGUFHeader(version)
        for _ in range(n_kv):
            key = string()
            v = value(take("I"), True)
            if v is not None:
                header.kv[key] = v
            if only and all(k in header.kv for k in only):
                return header
        if not tensors or only:
            return header
        import gguf
        import numpy as np

        for _ in range(n_tensors):
            name = string()
            dims = [int(take("Q")) for _ in range(take("I"))]
            qtype = gguf.GGMLQuantizationType(take("I"))
            take("Q")  # data offset
            params = int(np.prod(dims)) if dims else 1
            blk, size = gguf.GGML_QUANT_SIZES[qtype]
            header.tensors.append({"name": name, "type": qtype.name, "shape": dims, "params": params,
                                   "bytes": params // blk * size})
    return header
