"""A training run's scalars, evaluations and pictures in the experiment trackers users watch:
TensorBoard, MLflow and Weights & Biases, each through its own client library (optional extras).

``metrics.jsonl`` stays the run's record; :class:`Trackers` sends the same values, at the same
steps, to any subset of the trackers:

* **tensorboard** (``pip install cwdseg[tensorboard]``): ``torch.utils.tensorboard.SummaryWriter``,
  event files in ``<run_dir>/tensorboard``.
* **mlflow** (``pip install cwdseg[mlflow]``, the ``mlflow-skinny`` client): ``MLFLOW_TRACKING_URI``
  when set, else a file store in ``<run_dir>/mlruns`` (MLflow keeps that backend in maintenance mode
  behind ``MLFLOW_ALLOW_FILE_STORE``, which is granted for this default store only); experiment
  ``MLFLOW_EXPERIMENT_NAME`` or ``cwdseg``.
* **wandb** (``pip install cwdseg[wandb]``): W&B's own environment (``WANDB_PROJECT`` (default
  ``cwdseg``), ``WANDB_ENTITY``, ``WANDB_MODE=offline`` without a network, ...); files in ``<run_dir>/wandb``.

Steps are the ``step`` field of metrics.jsonl (the index of the last optimisation step run). A
resumed run (``resume_step > 0``) continues the same tracker runs: the MLflow run id and W&B run id
are kept in ``<run_dir>/trackers.json`` with the last step logged of each kind (scalars, eval,
images); a resumed run re-runs the steps after its last checkpoint, and those already logged are
skipped, so each tracker holds each step once. TensorBoard reopens with ``purge_step`` = one past the
last step recorded, which drops events written after that record (a kill between the two).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "trackers.json"
# metrics.jsonl fields that are bookkeeping, not measurements.
NOT_SCALARS = ("step", "num_steps")
KINDS = ("scalars", "eval", "images")


class TrackerError(RuntimeError):
    """A tracker that cannot be used as asked (unknown name, library missing), with the fix."""


def parse_log_to(value: str | Iterable[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` (or a list) -> the tracker names, in order, without repeats; empty/None -> []."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise TrackerError(f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)} (comma-separated)")
        if name not in names:
            names.append(name)
    return names


def log_to_arg(value: str) -> list[str]:
    """``argparse`` type of ``--log-to``: :func:`parse_log_to`, its error as the parser's one-line message."""
    import argparse

    try:
        return parse_log_to(value)
    except TrackerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _require(module: str, extra: str):
    """Import ``module`` or say in one line which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(f"--log-to {extra} needs the {extra} client library: "
                           f"pip install 'cwdseg[{extra}]'") from None


def scalars_of_record(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl line: ``loss/<term>`` for each loss term, then every other
    numeric field (``lr``, ``images_per_s``, ``iter_ms``, ``data_ms``, ``peak_mem_mb``, ``tflops``,
    ``mfu``, ``eta_s``, the weights' record ...) under its own name; None and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_SCALARS:
            continue
        if isinstance(value, Mapping):
            for sub, v in value.items():
                if _is_number(v):
                    out[f"{key}/{sub}"] = float(v)
        elif _is_number(value):
            out[key] = float(value)
    return out


def scalars_of_eval(metrics: Mapping[str, Any], prefix: str = "val") -> dict[str, float]:
    """``val/miou``, ``val/pixel_accuracy``, ``val/mean_accuracy`` and ``val/iou/<class>`` of an
    evaluation's results (:func:`cwdseg.evaluation.loop.evaluate_model`); fractions in [0, 1]."""
    out = {f"{prefix}/{k}": float(metrics[k]) for k in ("miou", "pixel_accuracy", "mean_accuracy")
           if _is_number(metrics.get(k))}
    for name, iou in (metrics.get("per_class_iou") or {}).items():
        if _is_number(iou):
            out[f"{prefix}/iou/{name}"] = float(iou)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``a.b`` keys; lists and other values as they are (the trackers stringify)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], purge_step: int | None) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        if purge_step is None:  # the configuration once, as text (hparams need a metric to show)
            text = "\n".join(f"    {k}: {json.dumps(v, default=str)}" for k, v in flatten_config(config).items())
            self.writer.add_text("config", text, 0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()

    def text(self, key: str, text: str) -> None:
        self.writer.add_text(key, text, 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_id: str | None) -> None:
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        with _allow_file_store(uri == (run_dir / "mlruns").resolve().as_uri()):
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cwdseg")
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
                self._params(config, run_id)
            else:
                try:
                    self.client.update_run(run_id, status="RUNNING")
                except Exception as exc:  # another store than the one the run started in
                    raise TrackerError(f"the MLflow run {run_id} of {run_dir / STATE_FILE} is not in {uri} "
                                       f"({type(exc).__name__}); set MLFLOW_TRACKING_URI to the store the run "
                                       "started in") from None
        self.run_id = run_id

    def _params(self, config: Mapping[str, Any], run_id: str) -> None:
        from mlflow.entities import Param

        # MLflow keeps params of at most 6000 characters, 100 per batch; logged once, at the start.
        params = [Param(k, json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
                  for k, v in flatten_config(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.client.log_image(self.run_id, image, key=key, step=step)

    def text(self, key: str, text: str) -> None:
        self.client.log_text(self.run_id, text, key.replace("/", "_") + ".md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@contextlib.contextmanager
def _allow_file_store(allow: bool):
    """MLflow refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; grant it for our default only."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if allow:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if allow:
            if before is None:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
            else:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


class _WandB:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_id: str | None) -> None:
        self.wandb = _require("wandb", "wandb")
        run_id = run_id or secrets.token_hex(4)  # W&B ids: letters and digits
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "cwdseg"), dir=str(run_dir),
                                   id=run_id, resume="allow", name=run_dir.name, config=dict(config),
                                   reinit="create_new")
        self.run_id = run_id

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self.run.log({k: self.wandb.Image(v) for k, v in images.items()}, step=step)

    def text(self, key: str, text: str) -> None:
        self.run.summary[key] = text

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one run; every call is a no-op when ``names`` is empty or ``enabled`` is False
    (the processes of a multi-GPU run other than rank 0).

    Args:
        names: tracker names (:data:`TRACKERS`, see :func:`parse_log_to`).
        run_dir: the run folder (TensorBoard events, the default MLflow store, W&B files, trackers.json).
        config: the resolved configuration, logged once as hyper-parameters (a fresh run only).
        resume_step: the step the run (re)starts from; 0 = a fresh run (new tracker runs, an old
            trackers.json in the folder is replaced), > 0 = continue the runs in trackers.json.
        enabled: False on the processes that do not log.
    """

    def __init__(self, names: Iterable[str], run_dir: str | Path, config: Mapping[str, Any] | None = None,
                 resume_step: int = 0, enabled: bool = True) -> None:
        self.names = parse_log_to(list(names)) if enabled else []
        self.run_dir = Path(run_dir)
        self.backends: dict[str, Any] = {}
        self.state: dict[str, Any] = {"runs": {}, "last_step": {}}
        if not self.names:
            return
        config = dict(config or {})
        if resume_step > 0 and (self.run_dir / STATE_FILE).is_file():
            self.state = json.loads((self.run_dir / STATE_FILE).read_text())
        last = max(self.state["last_step"].values(), default=None)
        runs = self.state["runs"]
        resuming = resume_step > 0
        for name in self.names:
            if name == "tensorboard":
                purge = (last + 1 if last is not None else resume_step) if resuming else None
                self.backends[name] = _TensorBoard(self.run_dir, config, purge)
            elif name == "mlflow":
                backend = _MLflow(self.run_dir, config, runs.get("mlflow") if resuming else None)
                runs["mlflow"] = backend.run_id
                self.backends[name] = backend
            else:
                backend = _WandB(self.run_dir, config, runs.get("wandb") if resuming else None)
                runs["wandb"] = backend.run_id
                self.backends[name] = backend
        self._save()

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _send(self, kind: str, step: int, method: str, payload: Mapping[str, Any]) -> None:
        """``backend.<method>(step, payload)`` on every tracker, once per step of ``kind``: a resumed run
        re-runs the steps after its last checkpoint, and those already logged are skipped."""
        last = self.state["last_step"].get(kind)
        if not self.backends or (last is not None and step <= last):
            return
        for backend in self.backends.values():
            getattr(backend, method)(step, payload)
        self.state["last_step"][kind] = step
        self._save()

    def _save(self) -> None:
        from cwdseg.checkpoint import atomic_write_text

        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=2) + "\n")

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One metrics.jsonl record (or any flat/nested dict of numbers) at ``step``."""
        self._send("scalars", step, "scalars", scalars_of_record(values))

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """An evaluation's mIoU, accuracies and per-class IoU (``val/...``) at ``step``."""
        self._send("eval", step, "scalars", scalars_of_eval(metrics))

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Pictures ``{name: (H, W, 3) uint8 RGB}`` at ``step`` (e.g. prediction panels)."""
        for name, image in images.items():
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3):
                raise ValueError(f"image {name!r} must be an (H, W, 3) uint8 RGB array, got "
                                 f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        self._send("images", step, "images", images)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}


def prediction_panels(model: Any, dataset: Any, device: Any, count: int = 2, normalization: Any = None,
                      info: Any = None, scale: float = 0.5, amp_dtype: Any = None) -> dict[str, np.ndarray]:
    """``{"val/panel_<i>": (h, w, 3) uint8 RGB}`` for the first ``count`` images of an evaluation
    dataset (``build_eval_dataset``): image | ground truth | prediction | errors in red
    (:func:`cwdseg.viz.segmaps.make_panel`), resized by ``scale``; the prediction is the whole-image
    protocol's (:func:`cwdseg.evaluation.inference.predict_ids`), as the evaluation scores it.

    ``normalization``: the input's (default: the dataset's, else Caffe BGR), to turn the network input
    back into the picture; ``info``: the classes and colours (default: the dataset's, else Cityscapes).
    """
    import torch

    from cwdseg.data.transforms import CAFFE_BGR
    from cwdseg.evaluation.inference import predict_ids
    from cwdseg.viz.segmaps import make_panel

    info = info if info is not None else getattr(dataset, "info", None)
    normalization = normalization or getattr(dataset, "normalization", None) or CAFFE_BGR
    num_classes = info.num_classes if info is not None else 19
    colors = None if info is None else info.colors
    was_training = model.training
    model.eval()
    panels = {}
    try:
        for i in range(min(count, len(dataset))):
            image, label = dataset[i][0], dataset[i][1]
            x = torch.as_tensor(image)[None].to(device)
            pred = predict_ids(model, x, num_classes=num_classes, amp_dtype=amp_dtype)[0].cpu().numpy()
            label = label.numpy() if hasattr(label, "numpy") else np.asarray(label)
            if label.shape != pred.shape:  # resized inputs (--short-side): the panel is drawn at the input's size
                import cv2

                label = cv2.resize(label, pred.shape[::-1], interpolation=cv2.INTER_NEAREST)
            bgr = normalization.to_bgr_uint8(np.asarray(image))
            panels[f"val/panel_{i}"] = np.ascontiguousarray(make_panel(bgr, label, pred, scale, colors)[..., ::-1])
    finally:
        model.train(was_training)
    return panels


def log_summary(names: Iterable[str], out_dir: str | Path, summary: Mapping[str, Any],
                chart_png: str | Path | None = None, markdown: str | None = None) -> None:
    """Push a grid's summary (:func:`cwdseg.evaluation.summary.summarize`) to the trackers, as one tracker
    run of its own in ``out_dir`` (TensorBoard events in ``out_dir/tensorboard``, ...).

    Each row's numbers go in as scalars ``summary/<method>[ <student>]/<column>`` at step 0 (``miou_mean``,
    ``miou_std``, ``delta_vs_baseline``, ``published``, ``n``, ``images_per_s``, device hours), the table
    as text (``markdown``, else the rows as JSON) and the bar chart ``chart_png`` as the image
    ``summary/chart``. ``names`` as ``--log-to`` (:func:`parse_log_to`).
    """
    names = parse_log_to(list(names) if not isinstance(names, str) else names)
    if not names:
        return
    rows = [dict(r) for r in summary.get("rows", [])]
    several_students = len({r.get("student") for r in rows}) > 1
    trackers = Trackers(names, out_dir, {"selection": summary.get("selection"), "rows": len(rows)})
    try:
        values: dict[str, float] = {}
        for row in rows:
            label = str(row.get("method")) + (f" {row.get('student')}" if several_students else "")
            values.update({f"summary/{label}/{k}": float(v) for k, v in row.items() if _is_number(v)})
        trackers.log_scalars(0, values)
        if chart_png is not None:
            import cv2

            picture = cv2.imread(str(chart_png), cv2.IMREAD_COLOR)
            if picture is None:
                raise TrackerError(f"{chart_png}: cannot be read as an image")
            trackers.log_images(0, {"summary/chart": np.ascontiguousarray(picture[..., ::-1])})
        text = markdown if markdown is not None else json.dumps(rows, indent=2, default=str)
        for backend in trackers.backends.values():
            backend.text("summary/table", text)
    finally:
        trackers.close()
