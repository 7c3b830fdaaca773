"""Any teacher -> any student: end-to-end runs through exp_cwd.sh with the architecture flags, the
pair checks (normalisation, the adversarial term across map sizes), run names, resume with a CIRKD-family
student, and evaluate.py on CIRKD-layout files. CPU, 64x64 crops, batch 2, 2 steps."""
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

from tests.test_train import ROOT, load, metric_lines, run

TINY = ["--input-size", "64,64", "--batch-size", "2", "--num-workers", "0", "--teacher-ckpt", "random",
        "--student-init", "random", "--log-every", "1", "--device", "cpu"]
CWD_LOGITS = ["channel", "kl", "3", "4", "False", "False", "False", "v1"]
CWD_FEATURE = ["channel", "kl", "35", "4", "False", "False", "True", "v1"]

# (teacher, student, head-feature channels of each, maps of different size at 64x64?)
PAIRS = {
    "dlv3r101_to_dlv3r18": ("deeplabv3_resnet101", "deeplabv3_resnet18", 256, 128, False),
    "dlv3r101_to_pspr18": ("deeplabv3_resnet101", "pspnet_resnet18", 256, 128, True),   # 8x8 vs 9x9
    "pspr101_to_dlv3mbv2": ("pspnet_resnet101", "deeplabv3_mobilenetv2", 512, 128, True),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=4, n_val=1, n_test=1, size=(96, 192), seed=0)
    return root


def exp_cwd(positional, data_dir, save_dir, extra):
    return run(["bash", str(ROOT / "exp_cwd.sh"), *positional, "--data-dir", str(data_dir), "--save-dir",
                str(save_dir), *TINY, *extra], env_extra={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["logits", "feature"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_exp_cwd_trains_any_pair(pair, mode, data_dir, tmp_path):
    teacher, student, t_ch, s_ch, resized = PAIRS[pair]
    positional = CWD_LOGITS if mode == "logits" else CWD_FEATURE
    proc = exp_cwd(positional, data_dir, tmp_path, ["--num-steps", "2", "--eval", "False",
                                                     "--teacher-arch", teacher, "--student-arch", student])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = "_".join([*positional[4:7], *positional[:4], positional[7]]) + f"_T-{teacher}_S-{student}"
    run_dir = tmp_path / name
    assert run_dir.is_dir(), list(tmp_path.iterdir())
    models = json.loads((run_dir / "config.json").read_text())["config"]["models"]
    assert (models["teacher_arch"], models["student_arch"]) == (teacher, student)
    assert models["student_normalization"] == models["teacher_normalization"] == "caffe_bgr"
    lines = metric_lines(run_dir)
    assert [r["step"] for r in lines] == [0, 1]
    assert all(set(r["loss"]) == {"ce", "cwd", "total"} and r["loss"]["cwd"] > 0 for r in lines)
    # said once, and only when the maps differ
    assert proc.stdout.count("give maps of different sizes") == (1 if resized else 0)
    last = load(run_dir / "last.pth")
    if mode == "feature":  # 1x1 connector from the student's head feature to the teacher's
        assert last["connector"]["cwd.0.weight"].shape == (t_ch, s_ch, 1, 1)
    else:
        assert last["connector"] is None
    student_file = load(run_dir / "city_1_G.pth")
    if student.startswith("deeplabv3"):
        assert any(k.startswith("pretrained.") for k in student_file) and "head.block.4.weight" in student_file


def test_normalisation_mismatch_is_an_error_naming_both(capsys):
    from cwdseg.cli import train

    argv = ["--cwd", "True", "--teacher-arch", "deeplabv3_resnet101", "--student-arch", "deeplabv3_resnet18",
            "--teacher-normalization", "imagenet_rgb"]
    with pytest.raises(SystemExit) as exc:
        train.resolve_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "teacher deeplabv3_resnet101 expects imagenet_rgb" in err
    assert "student deeplabv3_resnet18 expects caffe_bgr" in err and "--allow-normalization-mismatch" in err
    args = train.resolve_config(argv + ["--allow-normalization-mismatch"])
    assert (args.models.teacher_normalization, args.models.student_normalization) == ("imagenet_rgb", "caffe_bgr")
    # without a teacher there is no pair to check
    assert train.resolve_config(["--student-arch", "deeplabv3_resnet18", "--teacher-normalization",
                               "imagenet_rgb"]).models.student_normalization == "caffe_bgr"


def test_adversarial_term_across_map_sizes_is_refused_kd_resizes(capsys):
    from cwdseg.cli import train

    with pytest.raises(SystemExit):
        train.resolve_config(["--cwd", "True", "--adv", "True", "--teacher-arch", "deeplabv3_resnet101",
                            "--input-size", "512,512"])
    err = capsys.readouterr().err
    assert "teacher deeplabv3_resnet101 gives 64x64 maps and the student pspnet_resnet18 65x65" in err
    # Pixel-wise KD, like every distillation term, resizes the student map to the teacher's size.
    args = train.resolve_config(["--cwd", "True", "--kd", "True", "--teacher-arch", "deeplabv3_resnet101",
                               "--input-size", "512,512"])
    assert set(args.distill.terms) == {"cwd", "kd"}


def test_run_names_and_per_arch_defaults():
    from cwdseg.cli import train

    paper = train.resolve_config(["--cwd", "True"])
    assert paper.output.name == "False_False_False_channel_kl_3_4_train"  # the paper's pair: unchanged
    other = train.resolve_config(["--cwd", "True", "--teacher-arch", "deeplabv3_resnet101",
                                "--student-arch", "deeplabv3_mobilenetv2"])
    assert other.output.name.endswith("_T-deeplabv3_resnet101_S-deeplabv3_mobilenetv2")
    assert other.models.student_init == "ckpt/mobilenetv2-imagenet.pth"
    assert train.resolve_config(["--student-arch", "deeplabv3_resnet18"]).output.name == "baseline_S-deeplabv3_resnet18"
    assert train.resolve_config(["--exp-name", "x", "--cwd", "True", "--teacher-arch", "resnet18"]).output.name == \
        "x_T-pspnet_resnet18_S-pspnet_resnet18"
    assert train.resolve_config(["--save-name", "mine", "--student-arch", "deeplabv3_resnet18"]).output.name == "mine"


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical_for_a_cirkd_student(data_dir, tmp_path):
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), *TINY,
            "--cwd", "True", "--cwd-feat", "True", "--teacher-arch", "deeplabv3_resnet18",
            "--student-arch", "deeplabv3_mobilenetv2", "--num-steps", "6", "--save-last-every", "1",
            "--random-mirror", "--random-scale", "--eval", "False"]
    straight = run(base + ["--save-name", "straight"], env_extra={"OMP_NUM_THREADS": "1"})
    assert straight.returncode == 0, straight.stderr

    cmd = base + ["--save-name", "killed"]
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metric_lines(run_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(run_dir / "last.pth")["step"]
    assert 0 < killed_at < 6

    resumed = run(cmd, env_extra={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'last.pth'} at step {killed_at}/6" in resumed.stdout
    a, b = load(tmp_path / "straight" / "city_5_G.pth"), load(run_dir / "city_5_G.pth")
    assert a.keys() == b.keys() and any(k.startswith("pretrained.net.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill and resume"
    last_a, last_b = load(tmp_path / "straight" / "last.pth"), load(run_dir / "last.pth")
    for key in last_a["connector"]:
        assert torch.equal(last_a["connector"][key], last_b["connector"][key]), key


def test_resume_with_another_student_is_refused(data_dir, tmp_path):
    base = [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(tmp_path), "--save-name", "r",
            *TINY, "--num-steps", "1", "--eval", "False", "--student-arch", "deeplabv3_mobilenetv2"]
    assert run(base).returncode == 0
    proc = run([a if a != "deeplabv3_mobilenetv2" else "deeplabv3_resnet18" for a in base])
    assert proc.returncode != 0
    assert "student_arch: saved 'deeplabv3_mobilenetv2', now 'deeplabv3_resnet18'" in proc.stderr


def test_evaluate_infers_a_cirkd_student_and_its_normalisation(data_dir, tmp_path):
    from cwdseg.cli import evaluate
    from tests.factories import write_cirkd_deeplabv3

    write_cirkd_deeplabv3(tmp_path / "kd_deeplab_mobile_mobilenetv2_citys.pth", "mobilenetv2", seed=1)
    base = ["--data-dir", str(data_dir), "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--restore-from", str(tmp_path / "kd_deeplab_mobile_mobilenetv2_citys.pth")]
    res = evaluate.main(base)
    assert res["checkpoint"]["arch"] == "deeplabv3_mobilenetv2" and res["checkpoint"]["normalization"] == "caffe_bgr"
    other = evaluate.main(base + ["--normalization", "imagenet_rgb"])
    assert other["checkpoint"]["normalization"] == "imagenet_rgb"
    assert evaluate.cli(base + ["--arch", "deeplabv3_resnet18"]) == 2
