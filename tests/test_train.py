"""End-to-end training runs on the synthetic dataset (CPU, tiny crops, a few steps each)."""
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

from cwdseg.checkpoint import state_dict_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--input-size", "64,64", "--batch-size", "2", "--num-workers", "0", "--teacher-ckpt", "random",
        "--teacher-arch", "resnet18", "--student-init", "random", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=8, n_val=2, n_test=1, size=(96, 192), seed=0)
    return root


def run(cmd: list[str], cwd: Path = ROOT, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def exp_cwd(args: list[str], data_dir: Path, save_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return run(["bash", str(ROOT / "exp_cwd.sh"), *args, "--data-dir", str(data_dir), "--save-dir", str(save_dir),
                *TINY, *extra], env_extra={"PYTHON": sys.executable})


# One digest for the run's own log line and the test's comparison (bitwise-equal weights).
tensor_digest = state_dict_digest



def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# The four recipes through exp_cwd.sh
# ------------------------------------------------------------------------------------------------
RECIPES = {
    # name: (positional args, extra flags, loss terms expected in metrics.jsonl)
    "baseline": (["channel", "kl", "3", "4", "False", "False", "False", "base"], ["--cwd", "False"], {"ce"}),
    "cwd_logits": (["channel", "kl", "3", "4", "False", "False", "False", "v1"], [], {"ce", "cwd"}),
    "cwd_kd_adv": (["channel", "kl", "3", "4", "True", "True", "False", "v1"], [],
                   {"ce", "cwd", "kd", "adv_g", "d_wgan", "d_gp"}),
    "cwd_feat": (["channel", "kl", "35", "4", "False", "False", "True", "v1"], ["--teacher-arch", "resnet101"],
                 {"ce", "cwd"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_exp_cwd_recipe_writes_run_outputs(recipe, data_dir, tmp_path):
    positional, extra, expected_terms = RECIPES[recipe]
    proc = exp_cwd(positional, data_dir, tmp_path, ["--num-steps", "3", *extra])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kd, adv, feat, norm, div, weight, temp, version = (positional[4], positional[5], positional[6], *positional[:4],
                                                      positional[7])
    name = f"{kd}_{adv}_{feat}_{norm}_{div}_{weight}_{temp}_{version}"
    if recipe in ("cwd_logits", "cwd_kd_adv"):  # TINY's R18 teacher is not the paper's pair: named in the run
        name += "_T-pspnet_resnet18_S-pspnet_resnet18"
    run_dir = tmp_path / name
    assert run_dir.is_dir(), f"run folder {name} missing; have {list(tmp_path.iterdir())}"

    record = json.loads((run_dir / "config.json").read_text())
    config, terms = record["config"], record["config"]["distill"]["terms"]
    assert config["output"]["name"] == name and record["environment"]["torch_version"] == torch.__version__
    assert ("cwd" in terms) == (recipe != "baseline")
    assert ("kd" in terms) == (kd == "True") and ("adv" in terms) == (adv == "True")
    if "cwd" in terms:
        assert terms["cwd"]["on"] == ("feature" if feat == "True" else "logits")
        assert terms["cwd"]["weight"] == float(weight) and terms["cwd"]["tau"] == float(temp)
    assert config["data"]["crop_size"] == [64, 64] and config["optim"]["num_steps"] == 3

    lines = metric_lines(run_dir)
    assert [r["step"] for r in lines] == [0, 1, 2]
    for r in lines:
        assert set(r["loss"]) == expected_terms | {"total"}
        assert all(v == v for v in r["loss"].values())  # no NaN
        assert {"lr", "images_per_s", "iter_ms", "data_ms", "peak_mem_mb"} <= set(r)
    # poly schedule from the original: lr = 0.01 * (1 - step/3) ** 0.9
    assert [r["lr"] for r in lines] == pytest.approx([0.01 * (1 - s / 3) ** 0.9 for s in range(3)])

    student = load(run_dir / "city_2_G.pth")
    assert len(student) == 150 and not any(k.startswith("module.") or "num_batches" in k for k in student)
    last = load(run_dir / "last.pth")
    assert last["step"] == 3
    assert (last["discriminator"] is not None) == (adv == "True")
    assert (last["optimizer_d"] is not None) == (adv == "True")
    assert (last["connector"] is not None) == (feat == "True")
    if feat == "True":  # 1x1 conv 128 -> 512 for the R101 teacher's PSP feature
        assert last["connector"]["cwd.0.weight"].shape == (512, 128, 1, 1)
    assert tensor_digest(last["student"]) == tensor_digest(student)
    assert (run_dir / "city_2_D.pth").exists() == (adv == "True")

    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["selection"] == "final-iteration" and evaluation["step"] == 2
    assert 0.0 <= evaluation["miou"] <= 1.0 and len(evaluation["per_class_iou"]) == 19


@pytest.mark.slow
def test_loss_goes_down(data_dir, tmp_path):
    proc = run([sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path),
                "--save-name", "learn", *TINY, "--batch-size", "4", "--num-steps", "40", "--lr-g", "0.02",
                "--eval", "False"])
    assert proc.returncode == 0, proc.stderr
    ce = [r["loss"]["ce"] for r in metric_lines(tmp_path / "learn")]
    first, last = sum(ce[:5]) / 5, sum(ce[-5:]) / 5
    assert last < 0.8 * first, f"cross-entropy did not go down: first5 {first:.3f}, last5 {last:.3f}"


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------
RESUME_ARGS = ["--cwd", "True", "--kd", "True", "--adv", "True", "--num-steps", "8", "--save-last-every", "2",
               "--random-mirror", "--random-scale", "--eval", "False", "--num-workers", "1"]


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(data_dir, tmp_path):
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), *TINY, *RESUME_ARGS]
    straight = run(base + ["--save-name", "straight"])
    assert straight.returncode == 0, straight.stderr

    # Kill hard once step 5 is logged: last.pth then holds step 4, so the resume replays step 5.
    cmd = base + ["--save-name", "killed"]
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= 4 for r in metric_lines(run_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(run_dir / "last.pth")["step"]
    assert 0 < killed_at < 8
    assert not (run_dir / "city_7_G.pth").exists()

    resumed = run(cmd)  # the same command continues from last.pth
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'last.pth'} at step {killed_at}/8" in resumed.stdout

    a, b = load(tmp_path / "straight" / "city_7_G.pth"), load(run_dir / "city_7_G.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill and resume"
    last_a, last_b = load(tmp_path / "straight" / "last.pth"), load(run_dir / "last.pth")
    for key in last_a["discriminator"]:
        assert torch.equal(last_a["discriminator"][key], last_b["discriminator"][key]), key


@pytest.mark.slow
def test_sigterm_saves_a_loadable_last_checkpoint(data_dir, tmp_path):
    cmd = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--save-name", "term",
           *TINY, "--cwd", "True", "--num-steps", "1000", "--save-last-every", "1000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "term"
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and metric_lines(run_dir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved" in out
    last = load(run_dir / "last.pth")
    assert 1 <= last["step"] < 1000 and len(last["student"]) == 150
    assert last["optimizer_g"]["state"], "optimizer momentum must be saved for resume"


def test_resume_with_other_settings_is_refused(data_dir, tmp_path):
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--save-name", "r",
            *TINY, "--num-steps", "1", "--eval", "False"]
    assert run(base).returncode == 0
    proc = run(base + ["--lr-g", "0.5"])
    assert proc.returncode != 0
    assert "optim.lr: saved 0.01, now 0.5" in proc.stderr


@pytest.mark.slow
def test_eval_every_and_best_checkpoint_are_labelled(data_dir, tmp_path):
    proc = run([sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path),
                "--save-name", "ev", *TINY, "--num-steps", "4", "--eval-every", "2", "--save-best", "True"])
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "ev"
    history = [json.loads(line) for line in (run_dir / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1]  # step 2 of 4; the final step is eval.json's
    assert history[0]["selection"] == "intermediate"
    best = json.loads((run_dir / "best_val.json").read_text())
    assert best["selection"].startswith("best-val") and best["miou"] == history[0]["miou"]
    assert len(load(run_dir / "best_val_G.pth")) == 150
    assert json.loads((run_dir / "eval.json").read_text())["selection"] == "final-iteration"


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_gloo(data_dir, tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--save-name", "ddp", *TINY,
                "--batch-size", "4", "--num-steps", "3", "--cwd", "True", "--adv", "True", "--eval", "False"],
               env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digests = dict(re.findall(r"rank (\d)/2: student sha256 ([0-9a-f]{64})", proc.stdout))
    assert set(digests) == {"0", "1"}, proc.stdout
    assert digests["0"] == digests["1"], "ranks ended with different weights"
    assert digests["0"] == tensor_digest(load(tmp_path / "ddp" / "city_2_G.pth"))
    assert "2 process(es) x 1 micro-batch(es) x 2 images" in proc.stdout
    # rank 0 alone writes: one metrics line per step, not two
    assert [r["step"] for r in metric_lines(tmp_path / "ddp")] == [0, 1, 2]


@pytest.mark.slow
def test_grad_accumulation_keeps_the_effective_batch(data_dir, tmp_path):
    proc = run([sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path),
                "--save-name", "accum", *TINY, "--batch-size", "4", "--grad-accum", "2", "--num-steps", "2",
                "--eval", "False", "--cwd", "True", "--cwd-ignore-mask", "True"])
    assert proc.returncode == 0, proc.stderr
    assert "batch 4 per step = 1 process(es) x 2 micro-batch(es) x 2 images" in proc.stdout
    last = load(tmp_path / "accum" / "last.pth")
    assert last["sampler"]["samples_per_rank"] == 2 * 4
    lines = metric_lines(tmp_path / "accum")
    assert all(r["images_per_s"] > 0 and r["loss"]["cwd"] > 0 for r in lines)
    terms = json.loads((tmp_path / "accum" / "config.json").read_text())["config"]["distill"]["terms"]
    assert terms["cwd"]["ignore_mask"] is True


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positional, message", [
    (["channel", "kl", "3", "4", "False", "False", "False"], "expected 8 positional arguments, got 7"),
    (["chanel", "kl", "3", "4", "False", "False", "False", "v1"], "NORM must be channel, spatial, channel_mean or none"),
    (["channel", "js", "3", "4", "False", "False", "False", "v1"], "DIVERGENCE must be kl or mse"),
    (["channel", "kl", "three", "4", "False", "False", "False", "v1"], "WEIGHT must be a non-negative number"),
    (["channel", "kl", "3", "4", "yes", "False", "False", "v1"], "KD must be True or False, got 'yes'"),
    (["channel", "kl", "3", "4", "False", "False", "1", "v1"], "FEAT must be True or False"),
])
def test_exp_cwd_rejects_bad_positionals(positional, message):
    proc = run(["bash", str(ROOT / "exp_cwd.sh"), *positional])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "usage: bash exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--kd", "maybe"], "expected True or False, got 'maybe'"),
    (["--input-size", "512x512"], "expected H,W such as 512,512"),
    (["--norm-type", "pixel"], "invalid choice: 'pixel'"),
    (["--cwd-feat", "True"], "--cwd-feat True needs --cwd True"),
    (["--num-steps", "0"], "--num-steps must be positive"),
])
def test_train_rejects_bad_arguments(argv, message, capsys):
    from cwdseg.cli import train

    with pytest.raises(SystemExit) as exc:
        train.resolve_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_original_flag_spellings_are_accepted():
    from cwdseg.cli import train

    args = train.resolve_config([
        "--data-dir", "d", "--input-size", "256,512", "--kd", "True", "--adv", "False", "--cwd", "True",
        "--cwd-feat", "False", "--T_ckpt_path", "t.pth", "--is-student-load-imgnet", "False",
        "--student-pretrain-model-imgnet", "s.pth", "--num_classes", "19", "--save-ckpt-every", "100",
        "--random-mirror", "--random-scale", "True", "--lambda-cwd", "3", "--temperature", "4", "--gpu", "0",
    ])
    assert args.data.crop_size == (256, 512) and list(args.distill.terms) == ["cwd", "kd"]
    assert args.models.teacher_ckpt == "t.pth" and args.models.student_init == "random"  # --is-student-load-imgnet False
    assert args.output.save_every == 100 and args.data.random_mirror is True and args.data.random_scale is True
    assert args.output.name == "True_False_False_channel_kl_3_4_train" and args.engine.device == "cuda:0"


def test_defaults_are_the_original_recipe():
    from cwdseg.cli import train

    a = train.resolve_config([])
    assert (a.optim.num_steps, a.optim.batch_size, a.data.crop_size) == (40000, 8, (512, 512))
    assert (a.optim.lr, a.optim.momentum, a.optim.weight_decay, a.optim.power) == (0.01, 0.9, 5e-4, 0.9)
    assert a.optim.lr_d == 4e-4 and a.optim.optimizer == "sgd" and a.optim.warmup_steps == 0
    assert (a.optim.seed, a.data.random_mirror, a.data.random_scale) == (0, False, False)
    assert a.models.teacher_ckpt == "ckpt/teacher_city.pth"
    assert a.models.student_init == "ckpt/resnet18-imagenet.pth"
    terms = train.resolve_config(["--kd", "True", "--adv", "True"]).distill.terms
    assert terms["kd"]["weight"] == 10.0
    assert (terms["adv"]["weight"], terms["adv"]["d"], terms["adv"]["gp"]) == (0.001, 0.1, 10.0)


def test_missing_checkpoints_stop_with_a_message(data_dir, tmp_path):
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--device", "cpu",
            "--num-steps", "1", "--num-workers", "0"]
    proc = run(base + ["--cwd", "True", "--student-init", "random", "--teacher-ckpt", str(tmp_path / "nope.pth")])
    assert proc.returncode != 0
    assert str(tmp_path / "nope.pth") in proc.stderr and "README" in proc.stderr
    proc = run(base + ["--student-init", str(tmp_path / "imagenet.pth")])
    assert proc.returncode != 0
    assert str(tmp_path / "imagenet.pth") in proc.stderr


def test_poly_lr_matches_the_formula():
    from cwdseg.cli import train

    assert train.poly_lr(0.01, 0, 40000, 0.9) == 0.01
    assert train.poly_lr(0.01, 20000, 40000, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert train.poly_lr(0.01, 39999, 40000, 0.9) == pytest.approx(0.01 * (1 / 40000) ** 0.9)
