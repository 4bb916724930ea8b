"""Mutation check: does the suite fail where it matters? Each deliberate bug below is applied to the working
tree, the tests that should notice it run, and the file is restored byte for byte (also on Ctrl-C or a crash);
nothing is committed. A mutation is caught when at least one of its tests fails.

    .venv/bin/python tests/mutations/check.py                 # every mutation (~15 min on 2 busy cores)
    .venv/bin/python tests/mutations/check.py ocr-case kv-reuse
    .venv/bin/python tests/mutations/check.py --list
    .venv/bin/python tests/mutations/check.py --tests-from ../main   # another checkout's tests (e.g. older ones)

`--tests-from` runs that checkout's copies of the test files (those it has) against THIS working tree's
mutated code, e.g. to show which bugs an older suite let through. Prints a markdown table; exit 1 if a
mutation went uncaught.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Mutation:
    name: str
    bug: str
    edits: list[tuple[str, str, str]]  # (file, exact text, replacement): each text must occur exactly once
    tests: list[str]  # test files, relative to the repository root
    select: str = ""  # pytest -k expression
    extra: list[str] = field(default_factory=list)


MUTATIONS = [
    Mutation("qk-permute", "skip the q/k rope permute (writer and reader alike, so a GGUF round trip still agrees)", [
        ("model/llama_gguf.py", "    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)",
         "    return w"),
        ("model/llama_gguf.py", "    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)",
         "    return w"),
    ], ["tests/test_export_gguf.py", "tests/test_presets.py"], "logits or injection or metadata or smollm2"),
    Mutation("qk-unpermute-on-read", "read SmolLM2's GGUF without un-permuting q/k", [
        ("model/llama_gguf.py", "            w = unpermute_qk(w, n_head)\n", "            pass\n"),
        ("model/llama_gguf.py", "            w = unpermute_qk(w, n_head_kv)\n", "            pass\n"),
    ], ["tests/test_export_gguf.py", "tests/test_presets.py"], "metadata or smollm2"),
    Mutation("region-dropped-runtime", "the runtime feeds a zero row where the region embedding goes", [
        ("runtime/engine.py", "return [emb[p:p + 1] if isinstance(p, int) else p for p in parts]",
         "return [0 * emb[p:p + 1] if isinstance(p, int) else p for p in parts]"),
    ], ["tests/test_runtime.py"], "greedy or protocol"),
    Mutation("region-dropped-model", "the torch model leaves the <region> token's own embedding in place", [
        ("model/chatspot.py", "            emb = emb.masked_scatter(rmask, region.to(emb.dtype))\n", "            pass\n"),
    ], ["tests/test_model.py", "tests/test_export_gguf.py", "tests/test_export_bundle.py"],
        "change_the_output or injection or full_chain"),
    Mutation("kv-reuse", "a parked session is not saved: on its return it continues on the slot's KV (the other "
             "session's)", [
        ("runtime/engine.py", "victim._saved = self.llm.seq_save(slot) if victim._len else None",
         "victim._saved = b'parked' if victim._len else None"),
        ("runtime/engine.py", "        self.llm.seq_rm(slot, 0, -1)\n        self._slots[slot] = session",
         "        if session._saved is None:\n            self.llm.seq_rm(slot, 0, -1)\n        self._slots[slot] = session"),
        ("runtime/engine.py", "self.llm.seq_load(slot, session._saved)", "self.llm.seq_rm(slot, session._len, -1)"),
    ], ["tests/test_runtime.py", "tests/test_session.py"], "leak or reset"),
    Mutation("ocr-case", "score OCR case-sensitively", [
        ("evaluation/protocol.py", "    return a.lower() == text.strip().lower()", "    return a == text.strip()"),
    ], ["tests/test_protocol.py", "tests/test_runtime.py", "tests/test_train.py"], "ocr or protocol or evaluates"),
    Mutation("box-norm-off-by-one", "normalize pixel coordinates by (side - 1) instead of side", [
        ("chatspot_edge/referring.py", "        out.append(v / side)", "        out.append(v / max(1, side - 1))"),
    ], ["tests/test_referring.py", "tests/test_protocol.py"]),
    Mutation("grounding-norm-off-by-one", "normalize the grounding target box by (width - 1, height - 1)", [
        ("evaluation/protocol.py",
         "    tgt = (target_px[0] / width, target_px[1] / height, target_px[2] / width, target_px[3] / height)",
         "    tgt = (target_px[0] / (width - 1), target_px[1] / (height - 1), target_px[2] / (width - 1), "
         "target_px[3] / (height - 1))"),
    ], ["tests/test_protocol.py", "tests/test_runtime.py", "tests/test_train.py"], "grounding or protocol or evaluates"),
    Mutation("image-token-count", "expand <image> to N - 1 ids", [
        ("model/processor.py", "[t] * self.n_image if", "[t] * (self.n_image - 1) if"),
    ], ["tests/test_model.py"]),
    Mutation("no-end-of-turn", "the runtime ignores the end-of-turn token and stop strings", [
        ("runtime/engine.py", "            if clock(llm.is_eog, tok):", "            if False:"),
        ("runtime/engine.py", "            cut = _stop_at(text, eng.stop)", "            cut = None"),
    ], ["tests/test_runtime.py", "tests/test_session.py"], "stop or stream or greedy"),
    Mutation("image-cache-key", "the encoded-image cache is keyed by the image's shape, not its pixels", [
        ("runtime/engine.py", "key = hashlib.sha256(pixels.tobytes()).hexdigest()", "key = str(pixels.shape)"),
    ], ["tests/test_runtime.py", "tests/test_session.py"], "followup or greedy or cache"),
    Mutation("reset-keeps-kv", "Session.reset forgets the turns but keeps their KV", [
        ("runtime/engine.py", "            self.engine.llm.seq_rm(self._slot, self._prefix_len, -1)\n", "            pass\n"),
    ], ["tests/test_session.py", "tests/test_cli.py", "tests/test_runtime.py"], "reset or chat"),
    Mutation("hallucination-when-right", "count a hallucination even when the referred object is named too", [
        ("evaluation/protocol.py", "halluc.append(other and not ok)", "halluc.append(other)"),
    ], ["tests/test_protocol.py"]),
    Mutation("noise-one-offset", "move all four box coordinates by one shared offset", [
        ("evaluation/protocol.py", "d = rng.uniform(-s, s, size=4) * np.array", "d = rng.uniform(-s, s) * np.array"),
    ], ["tests/test_protocol.py"], "noisy"),
    Mutation("grad-accum-last-only", "--grad-accum: gradients cleared before each micro-batch (only the last counts)", [
        ("train/adapt.py", "                (loss / opts.grad_accum).backward()",
         "                opt.zero_grad(set_to_none=True)\n                (loss / opts.grad_accum).backward()"),
    ], ["tests/test_train_options.py"], "grad_accum"),
    Mutation("relation-one-choice", "one softmax over all six relation words (larger competes with left)", [
        ("model/position.py", "self.groups = tuple(groups) or (n_words,)", "self.groups = (n_words,)"),
    ], ["tests/test_relation_words.py"], "position_and_a_size"),
    Mutation("relation-gain-ignored", "the relation words are written as raw rows (0.3% of a trained region token)", [
        ("model/position.py", "        return out * (self.gain * scale", "        return out\n        return out * (self.gain * scale"),
    ], ["tests/test_relation_words.py"], "written_into"),
    Mutation("lora-not-merged", "--lora saves the peft-wrapped LLM without merging the adapters", [
        ("train/adapt.py", "            model.llm = model.llm.merge_and_unload()\n", "            pass\n"),
    ], ["tests/test_train_options.py"], "lora"),
]


def apply(m: Mutation) -> dict[Path, bytes]:
    """Apply every edit of `m`; returns the original bytes of each file touched (for `restore`)."""
    originals: dict[Path, bytes] = {}
    for rel, old, new in m.edits:
        path = ROOT / rel
        originals.setdefault(path, path.read_bytes())
        text = path.read_text()
        if text.count(old) != 1:
            restore(originals)
            raise SystemExit(f"{m.name}: {rel} holds {text.count(old)} copies of {old!r} (the code moved: update it)")
        path.write_text(text.replace(old, new))
    return originals


def restore(originals: dict[Path, bytes]) -> None:
    for path, data in originals.items():
        path.write_bytes(data)


def run_tests(m: Mutation, tests_root: Path) -> tuple[list[str], str, float]:
    """(failing test ids, pytest's last line, seconds) of the mutation's tests found under `tests_root`."""
    files = [t for t in m.tests if (tests_root / t).is_file()]
    if not files:
        return [], "no such test file in this checkout", 0.0
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--timeout", "900", *files, *m.extra]
    if m.select:
        cmd += ["-k", m.select]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=tests_root, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", r.stdout, re.M)))
    tail = (r.stdout.strip().splitlines() or [""])[-1]
    return failed, tail, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--tests-from", type=Path, default=ROOT, help="checkout whose test files run (default: this one)")
    args = ap.parse_args()
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.bug}")
        return
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    rows, missed = [], []
    for m in chosen:
        originals = apply(m)
        try:
            failed, tail, secs = run_tests(m, args.tests_from.resolve())
        finally:
            restore(originals)
        caught = bool(failed)
        if not caught:
            missed.append(m.name)
        by_test: dict[str, int] = {}  # test function -> failing parametrizations
        for f in failed:
            name = re.sub(r"\[.*\]$", "", f.split("/")[-1])
            by_test[name] = by_test.get(name, 0) + 1
        shown = ", ".join(name + (f" ({n} cases)" if n > 1 else "") for name, n in by_test.items())
        rows.append(f"| {m.name} | {m.bug} | {'yes' if caught else 'NO'} | {shown or tail} | {secs:.0f} |")
        print(rows[-1], flush=True)
    print("\n| mutation | bug | caught | failing tests | s |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if missed:
        print(f"\nnot caught: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
