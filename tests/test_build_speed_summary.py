"""build_speed's interleaved-round summary: medians per build, ratio to the fastest, paired ratio to the first."""

from chatspot_edge.benchmarks.build_speed import markdown, summarize


def _row(build: str, rnd: int, tg: float, rt_tg: float) -> dict:
    return {"build": build, "type": "Q4_0", "threads": 2, "round": rnd, "pp_tok_s": 100.0, "tg_tok_s": tg,
            "runtime": {"pp_tok_s": 90.0, "tg_tok_s": rt_tg}}


def test_summary_medians_ratios_and_pairing():
    # round 1 is a slow minute for both builds: medians and paired ratios must not be fooled by it
    rows = [_row("a", 0, 100, 80), _row("b", 0, 110, 80), _row("a", 1, 50, 40), _row("b", 1, 55, 40),
            _row("a", 2, 104, 82), _row("b", 2, 112, 86)]
    s = {r["build"]: r for r in summarize(rows, ["a", "b"])}
    assert s["a"]["rounds"] == 3 and s["a"]["lb_tg"] == 100.0 and s["b"]["lb_tg"] == 110.0
    assert s["b"]["lb_tg_vs_fastest"] == 1.0 and s["a"]["lb_tg_vs_fastest"] == round(100 / 110, 3)
    assert s["b"]["lb_tg_paired_vs_a"] == 1.1  # 1.1, 1.1, 112/104 = 1.077 -> median 1.1
    assert s["a"]["lb_tg_paired_vs_a"] == 1.0
    assert s["b"]["rt_tg"] == 80.0 and s["a"]["rt_tg_vs_fastest"] == 1.0
    table = markdown(list(s.values()))
    assert "| Q4_0 | 2 | a | 3 | 100.0 (100%) | 100.0 (91%) |" in table


def test_summary_skips_rows_without_rounds():
    rows = [_row("a", 0, 100, 80), {"build": "wheel (.venv)", "type": "Q4_0", "threads": 2, "runtime": {"tg_tok_s": 1}}]
    assert [r["build"] for r in summarize(rows, ["a"])] == ["a"]
