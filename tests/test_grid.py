"""The comparison grid end to end on the synthetic dataset: local launcher, summary, kill + resume, submitit."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cwdseg.engine.grid import GridError, TrainJob, job_env, job_status, make_executor, plan_grid, submit, train_command
from cwdseg.evaluation.summary import SummaryError, _throughput_and_hours, load_run

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["baseline", "pi_logits", "at=100+kd=1"]
SEEDS = ["0", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=4, n_val=1, n_test=1, size=(64, 128), seed=0)
    return root


def tiny(data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--input-size", "64,64", "--batch-size", "2", "--num-workers", "0",
            "--teacher-ckpt", "random", "--teacher-arch", "resnet18", "--student-init", "random", "--device", "cpu",
            "--log-every", "1", "--num-steps", "3", "--save-last-every", "1"]


def grid_cmd(save_dir: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tools.run_grid", "--methods", *METHODS, "--seeds", *SEEDS,
            "--save-dir", str(save_dir), "--", *tiny(data_dir)]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def kill_once_resumable(job) -> None:
    """Start one grid job and SIGKILL it once it has a last.pth but no eval.json yet."""
    proc = subprocess.Popen(train_command(job), cwd=ROOT, env=job_env() | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (Path(job.run_dir) / "last.pth").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert job_status(job) == "resume"


@pytest.mark.slow
def test_local_grid_summary_and_resume(data_dir, tmp_path):
    save_dir = tmp_path / "grid"
    jobs = plan_grid(METHODS, [0, 1], save_dir, tiny(data_dir))
    assert [j.name for j in jobs] == ["baseline_seed0", "baseline_seed1", "pi_logits_seed0", "pi_logits_seed1",
                                      "at100__kd1_seed0", "at100__kd1_seed1"]
    killed = jobs[2]
    kill_once_resumable(killed)

    proc = subprocess.run(grid_cmd(save_dir, data_dir), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[3/6] pi_logits_seed0: resuming" in proc.stdout
    assert proc.stdout.count(": starting") == 5
    assert f"resumed from {Path(killed.run_dir) / 'last.pth'} at step" in proc.stdout
    assert all(job_status(j) == "done" for j in jobs)

    # the summary against our own mean/std of the eval.json files
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["selection"] == "final-iteration"
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["baseline", "pi_logits", "at100_kd1"]
    means = {}
    for method, prefix in zip(rows, ["baseline", "pi_logits", "at100__kd1"]):
        values = [100 * json.loads((save_dir / f"{prefix}_seed{s}" / "eval.json").read_text())["miou"] for s in SEEDS]
        mean = sum(values) / 2
        std = ((values[0] - mean) ** 2 + (values[1] - mean) ** 2) ** 0.5  # sample std, n - 1 = 1
        means[method] = mean
        r = rows[method]
        assert r["n"] == 2 and r["seeds"] == [0, 1]
        assert r["miou_mean"] == pytest.approx(mean) and r["miou_std"] == pytest.approx(std)
        assert r["images_per_s"] > 0 and r["device_hours_total"] > 0
    assert rows["baseline"]["delta_vs_baseline"] is None
    assert rows["pi_logits"]["delta_vs_baseline"] == pytest.approx(means["pi_logits"] - means["baseline"])
    # the paper's Cityscapes figures are not shown beside runs on synthetic data
    assert all(r["published"] is None and r["data"] == ["synthetic"] for r in rows.values())
    table = (save_dir / "summary.md").read_text()
    assert sum(line.startswith("| ") and " ± " in line for line in table.splitlines()[4:]) == 3
    assert "final-iteration" in table
    assert (save_dir / "summary.png").stat().st_size > 1000

    # every active term and weight is in the config, metrics and eval of a run
    run = save_dir / "at100__kd1_seed0"
    terms = json.loads((run / "config.json").read_text())["config"]["distill"]["terms"]
    assert set(terms) == {"at", "kd"} and terms["at"]["weight"] == 100.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["loss"]) == {"ce", "at", "kd", "total"} and r["weights"] == {"at": 100.0, "kd": 1.0}
               for r in lines)
    assert json.loads((run / "eval.json").read_text())["distill"]["kd"]["weight"] == 1.0

    # again: nothing left to do
    again = subprocess.run(grid_cmd(save_dir, data_dir), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == 6 and "starting" not in again.stdout

    with pytest.raises(SummaryError, match="best_val.json"):
        load_run(run, selection="best")


@pytest.mark.slow
def test_submitit_debug_executor_runs_and_skips(data_dir, tmp_path):
    jobs = plan_grid(["kd=1"], [3], tmp_path / "grid", tiny(data_dir))
    executor = make_executor(tmp_path / "submitit", cluster="debug")
    submitted = submit(jobs, executor, log=lambda _: None)
    assert len(submitted) == 1
    assert submitted[0].result() == jobs[0].run_dir
    assert json.loads((Path(jobs[0].run_dir) / "eval.json").read_text())["seed"] == 3
    assert submit(jobs, executor, log=lambda _: None) == []  # finished: skipped


@pytest.mark.slow
def test_submitit_checkpoint_stops_train_py_with_a_saved_last_pth(data_dir, tmp_path):
    """What submitit does before a time limit / preemption: checkpoint() -> SIGTERM -> last.pth -> requeue."""
    import pickle

    argv = [a if a != "3" else "1000" for a in tiny(data_dir)]  # --num-steps 1000: still running when stopped
    job = plan_grid(["kd=1"], [0], tmp_path / "grid", argv)[0]
    tj = TrainJob(job)
    tj._proc = subprocess.Popen(train_command(job), cwd=ROOT, env=job_env() | {"OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(job.run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc = tj._proc
    delayed = tj.checkpoint()
    assert proc.returncode == 0 and job_status(job) == "resume"
    assert 1 <= torch.load(Path(job.run_dir) / "last.pth", weights_only=True)["step"] < 1000
    assert delayed.function is tj and tj._proc is None
    assert pickle.loads(pickle.dumps(delayed)).function.job == job  # requeued as the same grid job


@pytest.mark.parametrize("methods, seeds, extra, message", [
    (["nope"], [0], [], "neither a preset"),
    (["kd=1,tau=3"], [0], [], "unknown option 'tau=3'"),
    (["kd=1"], [0, 0], [], "seeds must be distinct"),
    (["kd=1"], [0], ["--seed", "4"], "--seed is set by the grid"),
    (["kd=1"], [0], ["--eval", "False"], "needs each run's final-iteration eval.json"),
])
def test_plan_grid_rejects(methods, seeds, extra, message, tmp_path):
    with pytest.raises(GridError, match=None) as exc:
        plan_grid(methods, seeds, tmp_path, extra)
    assert message in str(exc.value)


def test_run_grid_cli_bad_method_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.run_grid", "--methods", "bogus", "--save-dir", str(tmp_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "neither a preset" in proc.stderr and "Traceback" not in proc.stderr


def test_summarize_cli_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.summarize_runs", str(tmp_path / "nothing")], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_device_hours_count_each_step_once(tmp_path):
    # log lines every 2 steps; a resume after step 3 replays steps 2-3 (logged again, 100 ms/it then)
    lines = [dict(step=1, iter_ms=500.0, images_per_s=1.0), dict(step=3, iter_ms=300.0, images_per_s=2.0),
             dict(step=3, iter_ms=100.0, images_per_s=4.0), dict(step=5, iter_ms=200.0, images_per_s=3.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rate, hours = _throughput_and_hours(tmp_path, world_size=4)
    seconds = 2 * 0.5 + 2 * 0.1 + 2 * 0.2  # steps 0-1, 2-3 (the later line), 4-5
    assert hours == pytest.approx(seconds * 4 / 3600)
    assert rate == pytest.approx(statistics.fmean([4.0, 3.0]))  # the first line (start-up) left out


def test_train_step_updates_student_and_connectors_only():
    from cwdseg.cli.train import resolve_config
    from cwdseg.engine.build import build_criteria, build_engine, build_models, build_optimizers
    from cwdseg.engine.distributed import DistInfo
    from cwdseg.engine.step import train_step

    args = resolve_config(["--device", "cpu", "--teacher-ckpt", "random", "--student-init", "random",
                         "--teacher-arch", "resnet18", "--input-size", "64,64", "--batch-size", "2",
                         "--distill", "fitnet=1", "cwd_feat=3", "ifvd_feat=20", "dist=1", "kd_feat=1"])
    info = DistInfo()
    engine = build_engine(args, info)
    models = build_models(args, info, lambda *_: None)
    assert set(models.connector) == {"fitnet", "cwd_feat"}  # kd_feat: channels agree (128 = 128), none
    assert isinstance(models.connector["fitnet"], torch.nn.Conv2d)
    criteria, weights = build_criteria(args, models)
    opt_g, opt_d = build_optimizers(args, models, criteria)
    before = {k: v.clone() for k, v in models.connector.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    torch.manual_seed(0)
    labels = torch.randint(0, 19, (2, 64, 64))
    labels[:, :8] = 255
    terms = train_step([(torch.randn(2, 3, 64, 64), labels)], models, criteria, weights, opt_g, opt_d, engine)
    assert set(terms) == {"ce", "fitnet", "cwd_feat", "ifvd_feat", "dist", "kd_feat", "total"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["total"] == pytest.approx(sum(float(v) for k, v in terms.items() if k != "total"), rel=1e-5)
    after = models.connector.state_dict()
    assert not torch.equal(before["fitnet.weight"], after["fitnet.weight"])
    assert not torch.equal(before["cwd_feat.0.weight"], after["cwd_feat.0.weight"])
    assert all(p.grad is None for p in models.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in models.teacher.state_dict().items())


def _step_flops(spec_has_connector: bool, teacher: bool, crop=(64, 64), batch=2) -> float:
    """The test's own per-step FLOPs of an R18 student / R18 teacher pair from the models' MAC counts:
    2 x (3 x student fwd (aux head in) + teacher fwd (no aux head) + 3 x connector fwd) x batch."""
    from cwdseg.models import build_model
    from cwdseg.models.summary import conv_macs_by_module

    model = build_model("pspnet_resnet18")
    per_module = conv_macs_by_module(model, crop)
    student = sum(per_module.values())
    teacher_macs = sum(v for k, v in per_module.items() if not k.startswith("dsn.")) if teacher else 0
    fh, fw = crop[0] // 8 + 1, crop[1] // 8 + 1  # 64 -> 9 (ceil-mode pool)
    connector = fh * fw * 128 * 128 if spec_has_connector else 0
    return 2.0 * batch * (3 * student + teacher_macs + 3 * connector)


@pytest.mark.slow
def test_budget_matched_grid_stretches_the_cheap_runs_and_their_schedule(data_dir, tmp_path):
    save_dir = tmp_path / "matched"
    cmd = [sys.executable, "-m", "tools.run_grid", "--methods", "baseline", "cd_feat", "ifvd_feat", "--seeds", "0",
           "--budget", "flops", "--save-dir", str(save_dir), "--", *tiny(data_dir), "--num-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    costs = {"baseline": _step_flops(False, False), "cd_feat": _step_flops(True, True),
             "ifvd_feat": _step_flops(False, True)}
    top = costs["cd_feat"]  # the most expensive: teacher + connector
    manifest = {j["method"]: j for j in json.loads((save_dir / "grid.json").read_text())["jobs"]}
    for method, cost in costs.items():
        run = save_dir / f"{method}_seed0"
        budget = json.loads((run / "budget.json").read_text())
        assert budget == manifest[method]["budget"]
        assert budget["per_step"] == pytest.approx(cost, rel=1e-12)
        assert budget["stretch_exact"] == pytest.approx(top / cost, rel=1e-12)
        steps = round(2 * top / cost)
        assert budget["steps"] == steps and budget["stretch"] == steps / 2 and budget["matched_to"] == "cd_feat"
        optim = json.loads((run / "config.json").read_text())["config"]["optim"]
        assert optim["num_steps"] == steps
        # what the run spent: the schedule's images and the models' FLOPs
        spent = json.loads((run / "cost.json").read_text())
        assert spent["images_seen"] == steps * 2 and spent["total_flops"] == pytest.approx(steps * cost, rel=1e-12)
        # the poly schedule over the job's own length
        lrs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lrs] == list(range(steps))
        for r in lrs:
            assert r["lr"] == pytest.approx(optim["lr"] * (1 - r["step"] / steps) ** optim["power"], rel=1e-12)
    assert json.loads((save_dir / "baseline_seed0" / "budget.json").read_text())["steps"] > 2
    summary = json.loads((save_dir / "summary.json").read_text())
    base_row = next(r for r in summary["rows"] if r["method"] == "baseline")
    assert base_row["budget_stretch"] == [round(round(2 * top / costs["baseline"]) / 2, 6)]


def test_a_grid_whose_jobs_fail_says_so_and_exits_non_zero(tmp_path):
    save_dir = tmp_path / "failing"
    proc = subprocess.run([sys.executable, "-m", "tools.run_grid", "--methods", "baseline", "--seeds", "0", "1",
                           "--save-dir", str(save_dir), "--", "--data-dir", str(tmp_path / "no_data"),
                           "--device", "cpu", "--num-workers", "0", "--student-init", "random"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "2 of 2 job(s) failed; no table written" in proc.stderr and "Traceback" not in proc.stderr
    for seed in (0, 1):
        log = save_dir / "logs" / f"baseline_seed{seed}.log"
        line = next(x for x in proc.stderr.splitlines() if x.strip().startswith(f"baseline_seed{seed}:"))
        assert f"(log: {log})" in line and log.is_file() and "error:" in line and "no_data" in line
    assert not (save_dir / "summary.md").exists() and " on ." not in proc.stdout


def test_time_budget_from_measured_seconds_per_step(tmp_path):
    """--budget time: seconds per step = the median iteration time of a calibration run (first line left out);
    the jobs are matched on it exactly as on FLOPs."""
    from cwdseg.engine.grid import apply_budget, seconds_per_step

    times = {"baseline": [900.0, 100.0, 120.0, 110.0], "kd=1": [950.0, 160.0, 150.0, 170.0]}
    measured = {}
    for method, iter_ms in times.items():
        run = tmp_path / method
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "iter_ms": t}) + "\n"
                                                   for i, t in enumerate(iter_ms)))
        measured[(method, None)] = seconds_per_step(run)
        assert measured[(method, None)] == pytest.approx(statistics.median(iter_ms[1:]) / 1000)
    jobs = plan_grid(list(times), [0, 1], tmp_path / "grid", ["--num-steps", "1000"])
    matched = {j.name: j for j in apply_budget(jobs, "time", measured, 1000, "test")}
    steps = round(1000 * 0.160 / 0.110)
    assert matched["baseline_seed1"].budget["steps"] == steps and matched["kd1_seed0"].budget["steps"] == 1000
    assert matched["baseline_seed0"].train_args[-2:] == ("--num-steps", str(steps))
    assert matched["baseline_seed0"].train_args.count("--num-steps") == 1
    assert matched["baseline_seed0"].budget["unit"] == "s"
    assert apply_budget(jobs, "iterations", {}, 1000) == jobs
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "metrics.jsonl").write_text(json.dumps({"step": 0, "iter_ms": 5.0}) + "\n")
    with pytest.raises(GridError, match="--calibration-steps"):
        seconds_per_step(tmp_path / "short")
