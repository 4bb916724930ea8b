"""The `bench` sub-app of `chatspot-edge`: `bench BUNDLE ...` (measure) and `bench report FILE.json ...` (merge).

`bench BUNDLE` is shorthand for `bench run BUNDLE`: the group runs `run` when its first argument is not a
sub-command name. Only typer is imported at module level (so `chatspot-edge --help` stays instant).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup


class _DefaultRun(TyperGroup):
    """A group whose first argument, when it is not a sub-command, is the BUNDLE of `run`."""

    default = "run"

    def parse_args(self, ctx, args):  # noqa: ANN001 - click's signature
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_DefaultRun, no_args_is_help=True,
    help="Latency and memory benchmark: `bench BUNDLE --out FILE.json [...]` (same as `bench run`), "
         "`bench report FILE.json ... --out DIR`.")


@bench_app.command("run")
def bench_run(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    out: Optional[Path] = typer.Option(None, "--out", help="benchmark JSON to write (SPEC section 7)"),
    variants: Optional[str] = typer.Option(
        None, "--variants", help="LLM[:VISION],... e.g. Q4_K_M:int8,F16 (default: the default pair + every "
                                 "LLM variant x default / int8 vision)"),
    threads: str = typer.Option("auto", "--threads", help="auto (the runtime's choice, measured on this machine) or "
                                                          "thread counts, e.g. 1,2,4 (each variant runs at each)"),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help="decode threads (default: as "
                                                                             "--threads, or measured under auto)"),
    repeats: int = typer.Option(5, "--repeats", help="timed repeats after one warm-up (medians reported)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="checkpoint timed in PyTorch (fp32, bf16)"),
    reference_random_like: Optional[Path] = typer.Option(
        None, "--reference-random-like", help="checkpoint whose SHAPES are timed with random weights (latency only)"),
    device: str = typer.Option("cpu", "--device", help="reference device: cpu, cuda or auto"),
    max_tokens: int = typer.Option(24, "--max-tokens", help="answer length of the referring suite"),
    label: Optional[str] = typer.Option(None, "--label", help="machine name in reports (default: CPU model + cores)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="device class: phone-4gb, phone-8gb or laptop "
                                          "(its threads and context length; variants judged against its budgets)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="run nothing: each variant's memory estimated from "
                                 "manifest.json against the device classes (--profile: that one)"),
) -> None:
    """Benchmark a bundle's variants (each in a fresh process) and optionally a PyTorch reference."""
    from chatspot_edge.benchmarks import profiles
    from chatspot_edge.benchmarks.bench import format_table, run_bench
    from chatspot_edge.errors import InputError

    device_class = profiles.profile(profile) if profile else None
    if dry_run:
        typer.echo(profiles.format_estimates(profiles.dry_run(bundle, [profile] if profile else None)))
        return
    if out is None:
        raise InputError("--out FILE.json is required (or --dry-run)")
    if device_class is not None:
        threads = str(device_class.threads)
    result = run_bench(bundle, out, variants=variants, threads=threads, repeats=repeats, reference=reference,
                       device=device, reference_random_like=reference_random_like, max_tokens=max_tokens,
                       label=label, decode_threads=decode_threads, device_class=device_class)
    typer.echo(format_table(result))
    if device_class is not None:
        typer.echo(profiles.format_assessment(result["profile"]["assessment"]))
    failed = [f"{v['llm']}:{v['vision']} x{v.get('threads') or 'auto'}" for v in result["variants"] if v.get("error")]
    typer.echo(f"wrote {out}")
    if failed:
        typer.echo(f"error: {len(failed)} variant(s) failed: {', '.join(failed)} (see `error` in {out})", err=True)
        raise typer.Exit(1)


@bench_app.command("report")
def bench_report(
    files: List[Path] = typer.Argument(..., help="benchmark JSONs (from `bench` or benchmarks/gpu_reference.py)"),
    out: Path = typer.Option(..., "--out", help="folder for report.md and the plots"),
) -> None:
    """Merge benchmark JSONs from several machines into a Markdown table and PNG plots."""
    from chatspot_edge.benchmarks.report import write_report

    written = write_report(files, out)
    typer.echo(f"wrote {', '.join(str(p) for p in written.values())}")
