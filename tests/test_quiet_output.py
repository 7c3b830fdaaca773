"""Output that tells the user something: plain progress lines in logs, defaults that fit the machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.factories import write_legacy_student

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_progress_in_a_log_is_plain_lines(tmp_path):
    from cwdseg.data.synthetic import generate

    root = generate(tmp_path / "data", n_train=0, n_val=3, n_test=0, size=(64, 128), seed=2)
    write_legacy_student(tmp_path / "s.pth", seed=1)
    proc = subprocess.run([sys.executable, "evaluate.py", "--data-dir", str(root), "--restore-from",
                           str(tmp_path / "s.pth"), "--num-workers", "0", "--device", "cpu"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\r" not in proc.stdout  # stderr is a pipe here, not a terminal
    lines = [line for line in proc.stderr.splitlines() if line.startswith("eval val: ")]
    assert lines and lines[-1].startswith("eval val: 3/3 images"), proc.stderr


def test_no_progress_help_does_not_claim_a_default_of_true():
    from cwdseg.cli import evaluate

    text = " ".join(evaluate.get_args_parser().format_help().split())
    assert "--no-progress no progress output (default: a bar on a terminal, plain lines in a log)" in text
    assert "(default: True)" not in text.split("--no-progress", 1)[1].split("--", 1)[0]


def test_default_workers_fit_the_cores():
    from cwdseg.cli import train

    cores = len(os.sched_getaffinity(0))
    workers = train.resolve_config([]).data.num_workers
    assert 1 <= workers <= max(1, cores - 1)
