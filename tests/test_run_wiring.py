"""What train.py does around the loop, end to end: cwdseg.train(config) equals the command line bit for bit,
the teacher check stops a bad teacher before the first step, --log-to writes each step once (also after a
SIGKILL and a resume), every run records its cost, and a failed start leaves no run folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cwdseg
from cwdseg.checkpoint import state_dict_digest
from cwdseg.cli import train
from tests.test_trackers import mlflow_history, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
ENV.pop("MLFLOW_TRACKING_URI", None)
TINY = ["--input-size", "48,48", "--batch-size", "2", "--num-workers", "0", "--student-init", "random",
        "--teacher-arch", "resnet18", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n_train=4, n_val=2, n_test=1, size=(64, 128), seed=0)


def student_digest(path: Path) -> str:
    return state_dict_digest(torch.load(path, map_location="cpu", weights_only=True))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def metric_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def kill_after_lines(cmd: list[str], run_dir: Path, lines: int) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the group once ``lines`` metric lines are written."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(metric_lines(run_dir)) < lines:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def test_train_api_equals_the_command_line(data_dir, tmp_path):
    argv = ["--data-dir", str(data_dir), "--save-dir", str(tmp_path / "cli"), "--save-name", "r", *TINY,
            "--teacher-ckpt", "random", "--distill", "cwd=3", "kd=1", "--num-steps", "2", "--eval", "False"]
    proc = run([sys.executable, "train.py", *argv])
    assert proc.returncode == 0, proc.stderr
    cfg = train.resolve_config(argv)
    data = json.loads(json.dumps(cwdseg.config.to_dict(cfg)))
    data["output"]["save_dir"] = str(tmp_path / "api")
    (tmp_path / "config.json").write_text(json.dumps(data))
    # A plain dict, as a notebook would build it; in its own process with the command line's thread count
    # (float sums depend on it), so that the two runs can be compared bit for bit.
    code = ("import json, sys, cwdseg; print(cwdseg.train(json.load(open(sys.argv[1]))))")
    proc = run([sys.executable, "-c", code, str(tmp_path / "config.json")])
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "api" / "r"
    assert student_digest(run_dir / "city_1_G.pth") == student_digest(tmp_path / "cli" / "r" / "city_1_G.pth")
    with pytest.raises(cwdseg.config.ConfigError, match="optim.lr"):
        cwdseg.train(dict(data, optim={"lr": "fast"}))


def test_a_random_teacher_file_is_stopped_before_the_first_step(data_dir, tmp_path):
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    from cwdseg.models import build_model

    torch.save(build_model("pspnet_resnet18").state_dict(), teacher)  # weights that never saw the data
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), *TINY,
            "--teacher-ckpt", str(teacher), "--cwd", "True", "--num-steps", "1", "--eval", "False",
            "--teacher-check-images", "2"]
    proc = run([*base, "--save-name", "refused"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "teacher scores" in errors[0] and "--teacher-min-miou" in errors[0]
    assert "Traceback" not in proc.stderr and "step 1/1" not in proc.stdout
    assert not (tmp_path / "refused").exists()  # the failed start removed the folder it created
    proc = run([*base, "--save-name", "accepted", "--teacher-min-miou", "0"])
    assert proc.returncode == 0, proc.stderr
    check = json.loads((tmp_path / "accepted" / "config.json").read_text())["teacher_check"]
    assert check["threshold"] == 0 and check["num_images"] == 2 and 0 <= check["miou"] <= 100
    cost = json.loads((tmp_path / "accepted" / "cost.json").read_text())
    assert cost["images_seen"] == 2 and cost["total_flops"] > 0


@pytest.mark.slow
def test_log_to_holds_each_step_once_after_a_kill_and_resume(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    cmd = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--save-name", "t",
           *TINY, "--teacher-ckpt", "random", "--cwd", "True", "--num-steps", "5", "--save-last-every", "1",
           "--eval", "False", "--log-to", "tensorboard,mlflow"]
    run_dir = tmp_path / "t"
    kill_after_lines(cmd, run_dir, 3)
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    records = {}
    for line in metric_lines(run_dir):  # a resumed run re-runs the steps after its last checkpoint: keep the last
        record = json.loads(line)
        records[record["step"]] = record
    assert sorted(records) == [0, 1, 2, 3, 4]
    tb = tensorboard_scalars(run_dir)
    assert [s for s, _ in tb["loss/total"]] == [0, 1, 2, 3, 4]
    assert [v for _, v in tb["loss/total"]] == pytest.approx([records[s]["loss"]["total"] for s in range(5)])
    _, history, _ = mlflow_history(run_dir)
    assert [s for s, _ in history["loss/total"]] == [0, 1, 2, 3, 4]
    assert [v for _, v in history["loss/total"]] == pytest.approx([records[s]["loss"]["total"] for s in range(5)])


@pytest.mark.slow
def test_a_tap_no_model_exposes_trains_through_a_connector_and_resumes_bitwise(data_dir, tmp_path):
    """CWD from the teacher's layer3 (256 channels) to the student's layer2 (128), by name: no model file
    knows these taps; a connector bridges the widths; a SIGKILLed run resumes to the same weights."""
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), *TINY,
            "--teacher-ckpt", "random", "--distill", "cwd=3,s_tap=stage2,t_tap=layer3", "--num-steps", "4",
            "--save-last-every", "1", "--eval", "False"]
    straight = run([*base, "--save-name", "straight"])
    assert straight.returncode == 0, straight.stderr
    last = torch.load(tmp_path / "straight" / "last.pth", map_location="cpu", weights_only=True)
    assert last["connector"]["cwd.0.weight"].shape == (256, 128, 1, 1)
    assert last["config"]["distill"]["terms"]["cwd"]["s_tap"] == "stage2"
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"]["cwd"] > 0 for r in lines)

    cmd = [*base, "--save-name", "killed"]
    run_dir = tmp_path / "killed"
    kill_after_lines(cmd, run_dir, 2)
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert student_digest(run_dir / "city_3_G.pth") == student_digest(tmp_path / "straight" / "city_3_G.pth")


def test_an_unknown_tap_is_one_line_naming_the_available_ones(data_dir, tmp_path):
    proc = run([sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), *TINY,
                "--teacher-ckpt", "random", "--distill", "cwd=3,s_tap=layer9", "--num-steps", "1", "--eval", "False"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(error) == 1 and "unknown tap 'layer9'" in error[0] and "stage1" in error[0] and "layer4" in error[0]
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_summarize_runs_pushes_the_table_to_a_tracker(tmp_path):
    pytest.importorskip("tensorboard")
    from tests.test_stats import fabricate
    from tools import summarize_runs

    for seed, miou in enumerate((69.5, 70.3, 69.1)):
        fabricate(tmp_path / "grid", f"baseline_seed{seed}", seed, miou, None)
        fabricate(tmp_path / "grid", f"cwd_seed{seed}", seed, miou + 4, {"cwd": {"weight": 3.0, "tau": 4.0}})
    assert summarize_runs.main([str(tmp_path / "grid"), "--out-dir", str(tmp_path / "out"), "--log-to",
                                "tensorboard"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    scalars = tensorboard_scalars(tmp_path / "out")
    for row in summary["rows"]:
        assert scalars[f"summary/{row['method']}/miou_mean"] == [(0, pytest.approx(row["miou_mean"]))]
