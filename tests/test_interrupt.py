"""Real signals to real training runs: each leaves a last.pth from which the resumed run ends bitwise
equal to an uninterrupted one (CPU, 64x64 crops, batch 2, a dozen steps)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = ["--input-size", "64,64", "--batch-size", "2", "--teacher-ckpt", "random", "--teacher-arch", "resnet18",
        "--student-init", "random", "--log-every", "1", "--device", "cpu", "--cwd", "True", "--random-mirror",
        "--num-steps", str(STEPS), "--save-last-every", "1000", "--eval", "False"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=8, n_val=2, n_test=1, size=(96, 192), seed=0)
    return root


def train_cmd(data_dir: Path, save_dir: Path, name: str, workers: int, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    batch = ["--batch-size", "4"] if torchrun else []
    return [*launcher, "train.py", "--data-dir", str(data_dir), "--save-dir", str(save_dir), "--save-name", name,
            *ARGS, *batch, "--num-workers", str(workers)]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return len([line for line in path.read_text().splitlines() if line.strip()])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load(a), load(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"


def interrupt(cmd: list[str], run_dir: Path, send) -> subprocess.CompletedProcess:
    """Start ``cmd`` in its own process group, call ``send(proc)`` once two steps are logged, wait."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and steps_logged(run_dir) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    send(proc)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    save_dir = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(train_cmd(data_dir, save_dir, "straight", 0), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return save_dir / "straight" / f"city_{STEPS - 1}_G.pth"


SENDERS = {
    # Ctrl-C in a terminal reaches the whole foreground process group: main process and workers.
    "sigint_group": (lambda p: os.killpg(p.pid, signal.SIGINT), "SIGINT", 1),
    # Slurm / torchrun preemption: SIGTERM to the group while two loader workers run.
    "sigterm_group": (lambda p: os.killpg(p.pid, signal.SIGTERM), "SIGTERM", 2),
    # A scheduler's early warning (Slurm --signal=USR1@120 sends it to every process of the step).
    "usr1_group": (lambda p: os.killpg(p.pid, signal.SIGUSR1), "SIGUSR1", 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SENDERS))
def test_signal_saves_last_and_resume_is_bitwise_equal(case, data_dir, straight, tmp_path):
    send, name, workers = SENDERS[case]
    cmd = train_cmd(data_dir, tmp_path, case, workers)
    run_dir = tmp_path / case
    proc = interrupt(cmd, run_dir, send)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    found = re.search(rf"{name}: saved (\S+) at step (\d+)/{STEPS}; resume with the same command: ", proc.stdout)
    assert found, proc.stdout + proc.stderr
    stopped_at = int(found.group(2))
    assert Path(found.group(1)) == run_dir / "last.pth"
    assert 2 <= stopped_at < STEPS and load(run_dir / "last.pth")["step"] == stopped_at
    assert not (run_dir / f"city_{STEPS - 1}_G.pth").exists()
    assert not (run_dir / "run.lock").exists(), "a clean stop releases the folder"

    resumed = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'last.pth'} at step {stopped_at}/{STEPS}" in resumed.stdout
    assert_same_weights(straight, run_dir / f"city_{STEPS - 1}_G.pth")
    config = json.loads((run_dir / "config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [stopped_at]


@pytest.mark.slow
def test_torchrun_two_ranks_preempted_by_group_sigterm_resume_equal(data_dir, tmp_path):
    env = dict(ENV)
    straight = subprocess.run(train_cmd(data_dir, tmp_path, "ddp_straight", 1, torchrun=True), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "FutureWarning" not in straight.stderr, straight.stderr  # no per-rank deprecation noise

    cmd = train_cmd(data_dir, tmp_path, "ddp", 1, torchrun=True)
    run_dir = tmp_path / "ddp"
    proc = interrupt(cmd, run_dir, lambda p: os.killpg(p.pid, signal.SIGTERM))
    found = re.search(rf"SIGTERM: saved \S+ at step (\d+)/{STEPS}; rerun the same torchrun command", proc.stdout)
    assert found, proc.stdout + proc.stderr
    stopped_at = int(found.group(1))
    assert 2 <= stopped_at < STEPS and load(run_dir / "last.pth")["step"] == stopped_at

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {stopped_at}/{STEPS}" in resumed.stdout
    assert_same_weights(tmp_path / "ddp_straight" / f"city_{STEPS - 1}_G.pth", run_dir / f"city_{STEPS - 1}_G.pth")


# ------------------------------------------------------------------------------------------------
# The handler itself (no subprocess)
# ------------------------------------------------------------------------------------------------
def test_second_ctrl_c_aborts_and_a_forwarded_duplicate_does_not(monkeypatch):
    from cwdseg.engine import signals

    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    stop = signals.StopRequest()
    stop(signal.SIGINT, None)
    assert stop.requested and stop.signal_name == "SIGINT"
    clock[0] += 0.01  # torchrun forwarding the same press
    stop(signal.SIGINT, None)
    stop(signal.SIGTERM, None)  # a launcher's SIGTERM after the Ctrl-C: still one clean stop
    clock[0] += signals.DOUBLE_PRESS_S
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)


def test_abort_during_a_save_leaves_the_previous_file(tmp_path, monkeypatch):
    from cwdseg import checkpoint as ckpt

    path = tmp_path / "last.pth"
    ckpt.atomic_save({"step": 4}, path)
    before = path.read_bytes()

    def interrupted_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"step": 6}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"], "the temporary file is removed"
