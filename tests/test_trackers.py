"""cwdseg.engine.trackers: the lines of a real metrics.jsonl sent to TensorBoard, MLflow and W&B (offline),
read back with each project's own reader, and a killed-then-resumed run holding each step once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cwdseg.engine.trackers import TrackerError, Trackers, parse_log_to

# The metrics.jsonl of a real run, written by:
#   python train.py --demo --num-steps 3 --log-every 1 --input-size 64,64 --batch-size 2 --eval False \
#       --data-dir /tmp/demo/data --save-dir /tmp/demo/runs --save-name r1
# (kept here because the run takes ~30 s on a 2-core CPU).
METRICS_JSONL = """\
{"step": 0, "num_steps": 3, "loss": {"ce": 4.21073055267334, "cwd": 0.1741713434457779, "total": 4.384902000427246}, "lr": 0.01, "images_per_s": 0.23526394222328667, "iter_ms": 8501.090227000532, "data_ms": 25.936033998732455, "peak_mem_mb": 816.94140625, "tflops": 0.004114313769416462, "mfu": null, "eta_s": 17.002180454001063, "weights": {"cwd": 3.0}}
{"step": 1, "num_steps": 3, "loss": {"ce": 3.8832740783691406, "cwd": 0.20929095149040222, "total": 4.092565059661865}, "lr": 0.006942531626616071, "images_per_s": 0.5166040316004729, "iter_ms": 3871.437073001289, "data_ms": 18.694925001909724, "peak_mem_mb": 888.765625, "tflops": 0.009034410715317432, "mfu": null, "eta_s": 3.871437073001289, "weights": {"cwd": 3.0}}
{"step": 2, "num_steps": 3, "loss": {"ce": 4.294898509979248, "cwd": 0.20406121015548706, "total": 4.498959541320801}, "lr": 0.003720410580113015, "images_per_s": 0.3490142301518179, "iter_ms": 5730.425372999889, "data_ms": 0.6962010011193343, "peak_mem_mb": 888.9140625, "tflops": 0.00610358748249258, "mfu": null, "eta_s": 0.0, "weights": {"cwd": 3.0}}
"""
RECORDS = [json.loads(line) for line in METRICS_JSONL.splitlines()]
CONFIG = {"dataset": "cityscapes", "input_size": [64, 64], "batch_size": 2, "num_steps": 3, "lr_g": 0.01,
          "cwd": True, "temperature": 4.0, "student_arch": "pspnet_resnet18"}
# The shape of an evaluation's results (cwdseg.evaluation.loop.evaluate_model), two classes shown.
EVAL = {"miou": 0.125, "pixel_accuracy": 0.5, "mean_accuracy": 0.25, "per_class_iou": {"road": 0.2, "sky": 0.05}}


def expected_scalars(record: dict) -> dict[str, float]:
    """Written out independently of the module: the loss terms under loss/, every other number as is."""
    out = {f"loss/{k}": v for k, v in record["loss"].items()}
    out.update({f"weights/{k}": v for k, v in record["weights"].items()})
    for key in ("lr", "images_per_s", "iter_ms", "data_ms", "peak_mem_mb", "tflops", "eta_s"):
        out[key] = record[key]
    return out  # mfu is null on a CPU: not a scalar


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wbcfg",
                       "WANDB_CACHE_DIR": tmp_path / "wbcache", "WANDB_DATA_DIR": tmp_path / "wbdata"}.items():
        monkeypatch.setenv(var, str(value))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir


def available(*modules: str) -> list[str]:
    names = []
    for module in modules:
        pytest.importorskip(module)
        names.append(module)
    return names


# ---------------------------------------------------------------- readers (each project's own)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_image_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return [e.step for e in acc.Images(tag)]


def mlflow_history(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]], dict]:
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the reader also has to accept the file store
    try:
        client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("cwdseg")
        runs = client.search_runs([experiment.experiment_id])
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    assert len(runs) == 1, "a resumed run must continue the same MLflow run"
    run = runs[0]
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in run.data.metrics}
    return run.info.run_id, history, run.data.params


def wandb_records(path: Path) -> list:
    """The records of an offline ``run-<id>.wandb`` file: W&B's 7-byte header, then a LevelDB-style log
    (32 KiB blocks of ``crc32c(4) length(2, LE) type(1) payload`` chunks; types 1 full, 2 first,
    3 middle, 4 last) whose payloads are W&B's own protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_history(run_dir: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    ids, history = set(), {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.HasField("run"):
                ids.add(record.run.run_id)
            if record.HasField("history"):
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if key.startswith("_"):
                        continue
                    value = json.loads(item.value_json)
                    if isinstance(value, (int, float)):
                        history.setdefault(key, []).append((step, float(value)))
    return ids, {k: sorted(v) for k, v in history.items()}


# ---------------------------------------------------------------- tests


def test_parse_log_to_and_errors(monkeypatch, tmp_path):
    assert parse_log_to("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert parse_log_to("") == [] and parse_log_to(None) == []
    with pytest.raises(TrackerError, match="unknown tracker 'tensorbord'; valid: tensorboard, mlflow, wandb"):
        parse_log_to("mlflow,tensorbord")
    import argparse

    from cwdseg.engine.trackers import log_to_arg

    parser = argparse.ArgumentParser(prog="train.py")
    parser.add_argument("--log-to", type=log_to_arg, default=[])
    assert parser.parse_args(["--log-to", "wandb,mlflow"]).log_to == ["wandb", "mlflow"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-to", "mlfow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(TrackerError, match=r"pip install 'cwdseg\[wandb\]'"):
        Trackers(["wandb"], tmp_path)
    # the processes of a multi-GPU run other than rank 0 log nothing and write nothing
    off = Trackers(["wandb"], tmp_path, enabled=False)
    off.log_scalars(0, RECORDS[0])
    off.close()
    assert not list(tmp_path.iterdir())


def feed(trackers: Trackers, records: list[dict], eval_steps=(), image_steps=()) -> None:
    """What a run calls: every metrics line, an evaluation and a panel at some steps."""
    for record in records:
        trackers.log_scalars(record["step"], record)
        if record["step"] in eval_steps:
            trackers.log_eval(record["step"], EVAL)
        if record["step"] in image_steps:
            trackers.log_images(record["step"], {"val/panel_0": np.full((8, 24, 3), record["step"], np.uint8)})


def check_same(history: dict[str, list[tuple[int, float]]], records: list[dict], eval_steps, rel: float) -> None:
    for record in records:
        for key, value in expected_scalars(record).items():
            assert (record["step"], pytest.approx(value, rel=rel)) in history[key], (key, record["step"])
    for key in history:
        steps = [s for s, _ in history[key]]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
    assert set(history) >= {"val/miou", "val/iou/road", "val/iou/sky"}
    assert history["val/miou"] == [(s, pytest.approx(EVAL["miou"], rel=rel)) for s in eval_steps]
    assert history["val/iou/sky"] == [(s, pytest.approx(0.05, rel=rel)) for s in eval_steps]
    assert "mfu" not in history and "step" not in history and "num_steps" not in history


def test_three_steps_read_back_equal_metrics_jsonl(tracker_env):
    names = available("tensorboard", "mlflow", "wandb")
    run_dir = tracker_env
    trackers = Trackers(names, run_dir, CONFIG)
    feed(trackers, RECORDS, eval_steps=(2,), image_steps=(2,))
    trackers.close()

    tb = tensorboard_scalars(run_dir)
    check_same(tb, RECORDS, [2], rel=1e-6)  # TensorBoard keeps float32
    assert tensorboard_image_steps(run_dir, "val/panel_0") == [2]

    run_id, ml, params = mlflow_history(run_dir)
    check_same(ml, RECORDS, [2], rel=1e-12)
    assert json.loads(params["input_size"]) == [64, 64] and params["student_arch"] == "pspnet_resnet18"
    assert json.loads((run_dir / "trackers.json").read_text())["runs"]["mlflow"] == run_id

    ids, wb = wandb_history(run_dir)
    check_same(wb, RECORDS, [2], rel=1e-12)
    assert ids == {json.loads((run_dir / "trackers.json").read_text())["runs"]["wandb"]}


def test_killed_and_resumed_holds_each_step_once(tracker_env):
    names = available("tensorboard", "mlflow", "wandb")
    run_dir = tracker_env
    first = Trackers(names, run_dir, CONFIG)
    feed(first, RECORDS, eval_steps=(1,), image_steps=(1,))
    # killed: no close(); the last checkpoint was taken after step 1 (resume_step 2 steps done = index 1)
    for backend in first.backends.values():  # what a killed process leaves: written files, nothing more
        if hasattr(backend, "writer"):
            backend.writer.flush()
    if "wandb" in first.backends:
        first.backends["wandb"].run.finish()  # one process, one W&B run at a time (a killed one just stops)
    # the resumed run repeats step 2 (other timings) and goes on to steps 3 and 4
    rerun = [dict(r, iter_ms=r["iter_ms"] + 1000.0) for r in RECORDS[2:]]
    later = [dict(RECORDS[2], step=s, lr=0.001 * s) for s in (3, 4)]
    second = Trackers(names, run_dir, CONFIG | {"num_steps": 5}, resume_step=2)
    feed(second, rerun + later, eval_steps=(1, 4), image_steps=(1, 4))
    second.close()

    kept = RECORDS + later  # step 2 keeps the value logged first, as metrics.jsonl's first line for it
    tb = tensorboard_scalars(run_dir)
    check_same(tb, kept, [1, 4], rel=1e-6)
    assert [s for s, _ in tb["lr"]] == [0, 1, 2, 3, 4]
    assert tensorboard_image_steps(run_dir, "val/panel_0") == [1, 4]
    _, ml, params = mlflow_history(run_dir)
    check_same(ml, kept, [1, 4], rel=1e-12)
    assert params["num_steps"] == "3"  # hyper-parameters of the run as it started
    ids, wb = wandb_history(run_dir)
    check_same(wb, kept, [1, 4], rel=1e-12)
    assert len(ids) == 1, f"the resumed W&B run must keep its id, got {ids}"


def test_fresh_start_in_an_old_folder_is_a_new_run(tracker_env):
    names = available("mlflow")
    run_dir = tracker_env
    first = Trackers(names, run_dir, CONFIG)
    feed(first, RECORDS[:1])
    first.close()
    old = json.loads((run_dir / "trackers.json").read_text())["runs"]["mlflow"]
    second = Trackers(names, run_dir, CONFIG, resume_step=0)
    feed(second, RECORDS[:1])
    second.close()
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state["runs"]["mlflow"] != old and state["last_step"] == {"scalars": 0}


def test_grid_summary_goes_to_the_trackers(tracker_env, tmp_path):
    names = available("tensorboard", "mlflow")
    import cv2

    chart = tmp_path / "summary.png"
    cv2.imwrite(str(chart), np.full((20, 30, 3), (0, 0, 255), np.uint8))  # red, in BGR
    summary = {"selection": "final-iteration", "rows": [
        {"method": "baseline", "student": "pspnet_resnet18", "n": 2, "miou_mean": 0.70, "miou_std": 0.01,
         "delta_vs_baseline": None, "device": ["cpu"]},
        {"method": "cwd", "student": "pspnet_resnet18", "n": 2, "miou_mean": 0.74, "miou_std": None,
         "delta_vs_baseline": 0.04, "device": ["cpu"]}]}
    from cwdseg.engine.trackers import log_summary

    log_summary(",".join(names), tracker_env, summary, chart, markdown="| method | mIoU |")
    tb = tensorboard_scalars(tracker_env)
    assert tb["summary/cwd/miou_mean"] == [(0, pytest.approx(0.74))]
    assert tb["summary/cwd/delta_vs_baseline"] == [(0, pytest.approx(0.04))]
    assert "summary/baseline/delta_vs_baseline" not in tb and "summary/cwd/miou_std" not in tb
    assert tensorboard_image_steps(tracker_env, "summary/chart") == [0]
    _, ml, _ = mlflow_history(tracker_env)
    assert ml["summary/baseline/miou_mean"] == [(0, 0.70)] and ml["summary/baseline/n"] == [(0, 2.0)]
    texts = list((tracker_env / "mlruns").rglob("summary_table.md"))
    assert len(texts) == 1 and texts[0].read_text() == "| method | mIoU |"


def test_prediction_panels_show_image_truth_and_prediction(tmp_path):
    import cv2
    import torch

    from cwdseg.data.labels import TRAIN_ID_COLORS
    from cwdseg.data.synthetic import generate
    from cwdseg.data.transforms import IMAGENET_RGB
    from cwdseg.engine.trackers import prediction_panels
    from cwdseg.evaluation.loop import build_eval_dataset

    root = generate(tmp_path / "cityscapes", n_train=0, n_val=2, n_test=0, size=(32, 64), seed=1)
    dataset = build_eval_dataset(root, "val", normalization=IMAGENET_RGB)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 19, 1).double()
    model = torch.nn.Sequential(torch.nn.Identity())
    model.forward = lambda x: net(x.double()).float()  # a 1x1 conv: the prediction is computable by hand
    panels = prediction_panels(model, dataset, "cpu", count=5, normalization=IMAGENET_RGB, scale=1.0)
    assert sorted(panels) == ["val/panel_0", "val/panel_1"]
    for i, name in enumerate(sorted(panels)):
        panel = panels[name]
        assert panel.shape == (32, 4 * 64, 3) and panel.dtype == np.uint8
        bgr = cv2.imread(str(dataset.samples[i].image), cv2.IMREAD_COLOR)
        rgb = bgr[..., ::-1].astype(np.float64)
        assert np.abs(panel[:, :64].astype(np.float64) - rgb).max() <= 1.0  # the image, back from the input
        # prediction by hand: ImageNet-normalised RGB through the 1x1 conv, in float64
        x = (rgb - np.array(IMAGENET_RGB.mean)) / np.array(IMAGENET_RGB.std)
        w = net.weight.detach().numpy()[:, :, 0, 0]
        logits = x @ w.T + net.bias.detach().numpy()
        assert np.array_equal(panel[:, 128:192], TRAIN_ID_COLORS[logits.argmax(-1)])
