"""Intervals and differences of the summary against scipy/numpy, on fabricated run folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from cwdseg.evaluation import stats
from cwdseg.evaluation.summary import find_runs, load_run, summarize, to_markdown, write_summary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df", [1, 2, 3.7, 9, 30, 250])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_and_cdf_match_scipy(p, df):
    assert stats.t_ppf(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-10)
    assert stats.t_ppf(1 - p, df) == pytest.approx(sps.t.ppf(1 - p, df), rel=1e-9, abs=1e-10)
    for t in (-3.1, -0.4, 0.0, 1.3, 7.0):
        assert stats.t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), rel=1e-10, abs=1e-13)


def _scipy_interval(values, level=0.95):
    x = np.asarray(values, dtype=np.float64)
    return sps.t.interval(level, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(len(x)))


def test_mean_interval_matches_scipy():
    values = [70.1, 71.9, 70.6]
    ci = stats.mean_interval(values)
    low, high = _scipy_interval(values)
    assert (ci.n, ci.df) == (3, 2)
    assert ci.mean == pytest.approx(np.mean(values)) and ci.std == pytest.approx(np.std(values, ddof=1))
    assert (ci.low, ci.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    one = stats.mean_interval([70.0])
    assert one.std is None and one.low is None


def test_welch_difference_matches_scipy():
    a, b = [74.2, 75.1, 74.9, 73.8], [69.0, 71.3, 70.2]
    d = stats.welch_difference(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)  # Welch-Satterthwaite, by hand
    half = sps.t.ppf(0.975, df) * np.sqrt(va + vb)
    diff = np.mean(a) - np.mean(b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert d.test == "welch" and d.df == pytest.approx(df, rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(diff - half, rel=1e-9), pytest.approx(diff + half, rel=1e-9))
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-8)
    assert d.spans_zero is False


def test_paired_difference_matches_scipy():
    a, b = {0: 71.0, 1: 72.5, 2: 70.2}, {0: 70.4, 1: 72.6, 2: 69.1}
    d = stats.compare_to_baseline(a, b)
    diffs = np.array([a[s] - b[s] for s in (0, 1, 2)])
    low, high = _scipy_interval(diffs)
    ref = sps.ttest_rel([a[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)])
    assert d.test == "paired" and d.df == 2
    assert (d.low, d.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-8)
    assert d.spans_zero is True  # one seed got worse: the interval holds 0
    # different seeds: Welch
    assert stats.compare_to_baseline({0: 71.0, 5: 72.0}, b).test == "welch"


def fabricate(root: Path, name: str, seed: int, miou: float, distill: dict | None, steps: int = 100,
              budget: dict | None = None, cost: dict | None = None, eval_: bool = True) -> Path:
    """A run folder as train.py writes it (the files the summary reads)."""
    run = root / name
    run.mkdir(parents=True)
    from cwdseg.config import CONFIG_FORMAT, RunConfig, to_dict

    config = to_dict(RunConfig())
    config["optim"].update(seed=seed, num_steps=steps)
    config["distill"] = {"preset": None, "terms": distill or {}}
    config["eval"]["final"] = eval_
    config["data"]["root"] = "data/x"
    (run / "config.json").write_text(json.dumps({"format": CONFIG_FORMAT, "config": config,
                                                 "environment": {"world_size": 1, "device": "cpu"}}))
    if eval_:
        (run / "eval.json").write_text(json.dumps({"miou": miou / 100, "selection": "final-iteration"}))
    lines = [{"step": 9, "iter_ms": 100.0, "images_per_s": 20.0}, {"step": steps - 1, "iter_ms": 50.0,
                                                                  "images_per_s": 40.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if budget:
        (run / "budget.json").write_text(json.dumps(budget))
    if cost:
        (run / "cost.json").write_text(json.dumps(cost))
    return run


CWD = {"cwd": {"weight": 3.0, "tau": 4.0}}
KD = {"kd": {"weight": 10.0}}
BASE = {0: 69.5, 1: 70.3, 2: 69.1}
CWD_RUNS = {0: 71.2, 1: 72.0, 2: 71.5}
KD_RUNS = {3: 70.2, 4: 69.0}   # other seeds: Welch


@pytest.fixture()
def grid(tmp_path) -> Path:
    for s, v in BASE.items():
        fabricate(tmp_path, f"baseline_seed{s}", s, v, None, steps=150,
                  budget={"measure": "flops", "stretch": 1.5}, cost={"total_flops": 3e15, "images_seen": 1200})
    for s, v in CWD_RUNS.items():
        fabricate(tmp_path, f"cwd_seed{s}", s, v, CWD, cost={"total_flops": 3e15, "images_seen": 800})
    for s, v in KD_RUNS.items():
        fabricate(tmp_path, f"kd_seed{s}", s, v, KD)
    return tmp_path


def test_summary_rows_against_scipy(grid):
    summary = summarize([load_run(f) for f in find_runs([grid])])
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["selection"] == "final-iteration"
    for name, runs in (("baseline", BASE), ("cwd", CWD_RUNS), ("kd", KD_RUNS)):
        key = next(k for k in rows if k.startswith(name))
        r = rows[key]
        vals = list(runs.values())
        assert r["n"] == len(vals) and r["miou_mean"] == pytest.approx(np.mean(vals))
        assert r["miou_std"] == pytest.approx(np.std(vals, ddof=1))
        assert r["miou_ci95"] == pytest.approx(list(_scipy_interval(vals)), rel=1e-9)
    base = list(BASE.values())
    cwd = rows[next(k for k in rows if k.startswith("cwd"))]
    diffs = [CWD_RUNS[s] - BASE[s] for s in BASE]
    assert cwd["delta_test"] == "paired"
    assert cwd["delta_vs_baseline"] == pytest.approx(np.mean(diffs))
    assert cwd["delta_ci95"] == pytest.approx(list(_scipy_interval(diffs)), rel=1e-9)
    assert cwd["delta"]["p_value"] == pytest.approx(sps.ttest_rel(list(CWD_RUNS.values()), base).pvalue, rel=1e-8)
    kd = rows[next(k for k in rows if k.startswith("kd"))]
    ref = sps.ttest_ind(list(KD_RUNS.values()), base, equal_var=False)
    assert kd["delta_test"] == "welch" and kd["delta"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert kd["delta_spans_zero"] is True and cwd["delta_spans_zero"] is False
    assert rows["baseline"]["budget_stretch"] == [1.5] and rows["baseline"]["num_steps"] == [150]
    assert rows["baseline"]["published"] == 69.10 and rows["baseline"]["data"] == ["cityscapes"]
    assert rows["baseline"]["train_flops_per_run"] == 3e15 and cwd["images_seen_per_run"] == 800
    table = to_markdown(summary)
    assert f"spans 0 for {kd['method']}" in table and "×1.5" in table
    assert f"[{cwd['delta_ci95'][0]:+.2f}, {cwd['delta_ci95'][1]:+.2f}]" in table
    paths = write_summary(summary, grid / "out")
    assert paths["chart"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["rows"][1]["delta_test"] == "paired"


def test_summarize_cli_names_a_run_without_evaluation(tmp_path):
    run = fabricate(tmp_path, "noeval", 0, 0.0, None, steps=40, eval_=False)
    proc = subprocess.run([sys.executable, "-m", "tools.summarize_runs", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "trained with --eval False, so it has no evaluation" in proc.stderr
    assert f"python evaluate.py --restore-from {run / 'city_39_G.pth'} --data-dir data/x" in proc.stderr
    assert "has not finished" not in proc.stderr
