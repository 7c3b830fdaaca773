"""The pieces of a training run that ``cwdseg.cli.train.main`` calls in order: seeding, the batch split,
the demo data, resume, the config record, the train loader, validation and the final save/evaluation."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from cwdseg import checkpoint as ckpt
from cwdseg.config import RunConfig, to_dict
from cwdseg.data.cityscapes import build_loader
from cwdseg.data.errors import DatasetError
from cwdseg.data.registry import build_dataset, dataset_info
from cwdseg.data.sampling import TrainSampleStream
from cwdseg.data.transforms import NORMALIZATIONS, Normalization
from cwdseg.engine.build import RANDOM, Engine, Models, maps_differ
from cwdseg.engine.compute import run_cost_from_folder, write_cost
from cwdseg.engine.distributed import DistInfo, barrier
from cwdseg.engine.precision import amp_dtype
from cwdseg.engine.runlog import code_version
from cwdseg.engine.state import load_last
from cwdseg.engine.state import write_config as record_config
from cwdseg.engine.trackers import Trackers, prediction_panels
from cwdseg.evaluation.loop import EvaluationError, build_eval_dataset, build_eval_loader, evaluate_model
from cwdseg.evaluation.teacher_check import check_teacher, run_threshold


class RunSetupError(RuntimeError):
    """A run that cannot be set up as asked (the batch split, a missing --resume file), with the fix."""


# The synthetic Cityscapes copy --demo generates when its root is missing.
DEMO_DATASET = dict(n_train=24, n_val=6, n_test=4, size=(256, 512), seed=0)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = not deterministic


def per_rank_batch(cfg: RunConfig, info: DistInfo) -> int:
    batch, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    per_rank, rem = divmod(batch, info.world_size * accum)
    if rem or per_rank == 0:
        raise RunSetupError(f"--batch-size {batch} does not split into {info.world_size} processes x "
                            f"--grad-accum {accum}; choose a batch size divisible by their product")
    if per_rank == 1 and ckpt_needs_two(cfg.models.student_arch):
        raise RunSetupError(f"--batch-size {batch} leaves 1 image per process and micro-batch, but the "
                            f"{cfg.models.student_arch} student's BatchNorm after the pooled 1x1 branch needs >= 2 "
                            "samples; use --batch-size >= 2 per process (with --grad-accum to keep memory low)")
    return per_rank


def ckpt_needs_two(arch: str) -> bool:
    """Whether a network's training-mode BatchNorm sees a 1x1 map (pooled branches: PSP, ASPP), which
    needs more than one sample per batch."""
    return arch.startswith(("pspnet", "deeplabv3"))


def prepare_run(cfg: RunConfig, info: DistInfo) -> tuple[RunConfig, int, object, bool]:
    """Everything checked before the run folder exists (the demo's data generated, a folder dataset's classes
    read, the batch split, the weight files, the training split), then the folder and its lock.
    Returns ``(cfg, per-rank batch, training split, whether this start created the folder)``."""
    from cwdseg.engine import runlock
    from cwdseg.engine.state import check_input_files

    if cfg.output.demo:
        prepare_demo_data(cfg, info)
    cfg = with_dataset_classes(cfg)
    seed_everything(cfg.optim.seed, cfg.engine.deterministic, info.device)
    per_rank = per_rank_batch(cfg, info)
    check_input_files(cfg)
    train_set = build_train_set(cfg, info)
    created = not cfg.run_dir.exists()
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    runlock.acquire_for_run(cfg.run_dir, info)  # one run per folder; released at exit
    o = cfg.optim
    if info.is_main and (info.distributed or o.grad_accum > 1):
        print(f"batch {o.batch_size} per step = {info.world_size} process(es) x {o.grad_accum} micro-batch(es) "
              f"x {per_rank} images (the recipe's effective batch is kept)", flush=True)
    return cfg, per_rank, train_set, created


def with_dataset_classes(cfg: RunConfig) -> RunConfig:
    """A folder dataset's class count, read from its classes.json once the data exist (the demo generates
    them after the configuration is resolved); the other datasets' counts are resolved already."""
    info = dataset_info(cfg.data.dataset, cfg.data.root) if cfg.data.dataset == "folder" else None
    if info is None:
        return cfg
    if cfg.data.num_classes is not None and cfg.data.num_classes != info.num_classes:
        raise DatasetError(f"--num-classes {cfg.data.num_classes} contradicts the {info.num_classes} classes of "
                           f"{cfg.data.root}/classes.json; drop --num-classes")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=info.num_classes))


def prepare_demo_data(cfg: RunConfig, info: DistInfo) -> None:
    root, dataset = Path(cfg.data.root), cfg.data.dataset
    if dataset == "cityscapes" and (root / "leftImg8bit").is_dir():
        return
    if dataset != "cityscapes" and (root / "synthetic.json").is_file():
        return
    if info.is_main:
        if dataset == "cityscapes":
            from cwdseg.data.synthetic import generate

            print(f"demo: generating the synthetic Cityscapes-format dataset in {root}", flush=True)
            generate(root, **DEMO_DATASET)
        else:
            from cwdseg.data.synthetic_zoo import generate_dataset

            print(f"demo: generating a synthetic {dataset} dataset in its official layout in {root}", flush=True)
            generate_dataset(dataset, root, n_train=24, n_val=6, n_test=4, seed=0)
    barrier()


def resume_step(cfg: RunConfig, resume: str | None, run_dir: Path, models: Models, criteria, opt_g, opt_d,
                engine: Engine, log) -> int:
    """The step to start from: 0, or the one stored in ``resume`` / the run folder's last.pth."""
    last_path = run_dir / "last.pth"
    resume_from = Path(resume) if resume else (last_path if last_path.exists() else None)
    if resume and not resume_from.exists():
        raise RunSetupError(f"--resume {resume}: no such file")
    if resume_from is None:
        return 0
    step = load_last(resume_from, models, criteria, opt_g, opt_d, engine, cfg)
    log(f"resumed from {resume_from} at step {step}/{cfg.optim.num_steps}")
    return step


def write_config(cfg: RunConfig, info: DistInfo, run_dir: Path, per_rank: int, start_step: int) -> None:
    environment = dict(code_version=code_version(), torch_version=torch.__version__, world_size=info.world_size,
                       per_rank_batch=per_rank, device=str(info.device))
    record_config(run_dir, cfg, environment, start_step)  # a resume appends a record instead of rewriting


def build_train_set(cfg: RunConfig, info: DistInfo):
    """The training split (built before the run folder exists, so a wrong data folder leaves nothing behind)."""
    d = cfg.data
    return build_dataset(
        d.dataset, d.root, "train", d.train_list, crop_size=d.crop_size,
        random_scale=d.random_scale, random_mirror=d.random_mirror, ignore_label=d.ignore_label,
        cache_images=d.cache_images, verbose=info.is_main, image_cache=d.image_cache,
        normalization=NORMALIZATIONS[cfg.models.student_normalization],
        uint8_images=True,  # batches travel as uint8 and are normalised on the device (next_micro_batches)
    )


def build_train_loader(cfg: RunConfig, train_set, info: DistInfo, per_rank: int, start_step: int):
    d = cfg.data
    stream = TrainSampleStream(len(train_set), seed=cfg.optim.seed, rank=info.rank, world_size=info.world_size,
                               start=start_step * per_rank * cfg.optim.grad_accum)
    return build_loader(train_set, batch_size=per_rank, sampler=stream, num_workers=d.num_workers,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.optim.seed))


def next_micro_batches(data_iter, grad_accum: int, engine: Engine,
                       normalization: Normalization) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``grad_accum`` (images, labels) pairs, on the device in the engine's memory format. Images arrive as
    uint8 (picture + content mask, a quarter of float32's bytes) and are normalised on the device, equal
    bit for bit to the loader's float32 normalisation (``Normalization.to_float_tensor``)."""
    non_blocking = engine.device.type == "cuda"
    mem = torch.channels_last if engine.channels_last else torch.contiguous_format
    micro = []
    for _ in range(grad_accum):
        images, labels, _names = next(data_iter)
        images = normalization.to_float_tensor(images.to(engine.device, non_blocking=non_blocking))
        micro.append((images.contiguous(memory_format=mem), labels.to(engine.device, non_blocking=non_blocking).long()))
    return micro


def student_meta(cfg: RunConfig) -> dict:
    """What a student file written by this run says about itself (architecture, classes, input)."""
    info = dataset_info(cfg.data.dataset, cfg.data.root)
    return {"arch": cfg.models.student_arch, "num_classes": cfg.data.num_classes, "dataset": cfg.data.dataset,
            "class_names": list(info.class_names), "class_colors": info.colors.tolist(),
            "normalization": cfg.models.student_normalization, "config": to_dict(cfg)}


@contextlib.contextmanager
def removed_on_failure(run_dir: Path, created: bool, info: DistInfo):
    """A fresh run folder that this start created is removed again when the start fails (nothing trained
    yet: a wrong teacher, a refused check), so it does not block or confuse the next run."""
    try:
        yield
    except BaseException:
        if created and info.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_teacher_first(cfg: RunConfig, models: Models, engine: Engine, run_dir: Path, log) -> None:
    """Before the first step: the teacher on the first ``eval.teacher_check_images`` val images, logged,
    stored in config.json, and the run stopped (TeacherCheckError, one line) below the threshold
    (``eval.teacher_min_miou``, default the published figure of that teacher - 5, see teacher_check.py)."""
    n, m = cfg.eval.teacher_check_images, cfg.models
    if not n or models.teacher is None or m.teacher_ckpt == RANDOM:
        return
    try:
        val = build_eval_dataset(cfg.data.root, "val", cfg.data.val_list, max_images=n,
                                 ignore_label=cfg.data.ignore_label, dataset=cfg.data.dataset,
                                 normalization=NORMALIZATIONS[m.teacher_normalization])
    except (EvaluationError, DatasetError) as exc:
        log(f"teacher check skipped (no val split to check on: {exc})")
        return
    threshold, why = run_threshold(m.teacher_arch, cfg.data.dataset, cfg.data.num_classes, cfg.data.root,
                                   cfg.eval.teacher_min_miou)
    record = check_teacher(models.teacher, val, num_images=n, num_classes=cfg.data.num_classes,
                           device=engine.device, threshold_miou=threshold, amp=cfg.engine.amp)
    log(f"teacher check: {record['miou']:.2f} % mIoU on the first {record['num_images']} val images "
        f"(required {threshold:.2f} %: {why})")
    path = run_dir / "config.json"
    ckpt.atomic_write_text(path, json.dumps(json.loads(path.read_text()) | {"teacher_check": record}, indent=2) + "\n")


def build_trackers(cfg: RunConfig, run_dir: Path, start_step: int, info: DistInfo) -> Trackers:
    """The run's trackers (``--log-to``): the configuration as hyper-parameters, continued on resume."""
    return Trackers(cfg.output.log_to, run_dir, to_dict(cfg), resume_step=start_step, enabled=info.is_main)


class Validation:
    """Val evaluations of the student during and after training (the val loader is built once, on first use);
    each goes to the trackers too, with a few prediction panels."""

    def __init__(self, cfg: RunConfig, run_dir: Path, trackers: Trackers | None = None) -> None:
        self.cfg, self.run_dir, self.loader, self.best_miou = cfg, run_dir, None, -1.0
        self.trackers = trackers

    def track(self, models: Models, engine: Engine, step: int, metrics: dict) -> None:
        if not self.trackers:
            return
        self.trackers.log_eval(step, metrics)
        self.trackers.log_images(step, prediction_panels(
            models.student_module, self.loader.dataset, engine.device, count=2,
            normalization=NORMALIZATIONS[self.cfg.models.student_normalization],
            amp_dtype=amp_dtype(self.cfg.engine.amp, engine.device)))

    def run(self, models: Models, engine: Engine, step: int, tag: str) -> dict:
        cfg = self.cfg
        if self.loader is None:
            val_set = build_eval_dataset(cfg.data.root, "val", cfg.data.val_list, ignore_label=cfg.data.ignore_label,
                                         dataset=cfg.data.dataset,
                                         normalization=NORMALIZATIONS[cfg.models.student_normalization])
            self.loader = build_eval_loader(val_set, batch_size=1, num_workers=min(cfg.data.num_workers, 2))
        metrics = evaluate_model(models.student_module, self.loader, num_classes=cfg.data.num_classes,
                                 device=engine.device, amp=cfg.engine.amp, progress=sys.stdout.isatty())
        metrics.update({"step": step, "selection": tag, "run": cfg.output.name, "seed": cfg.optim.seed,
                        "preset": cfg.distill.preset, "distill": cfg.distill.terms,
                        "student_arch": cfg.models.student_arch})
        return metrics

    def intermediate(self, models: Models, engine: Engine, step: int, log) -> None:
        metrics = self.run(models, engine, step - 1, "intermediate")
        log(f"step {step}: val mIoU {100 * metrics['miou']:.2f} %")
        self.track(models, engine, step - 1, metrics)
        with open(self.run_dir / "eval_history.jsonl", "a") as f:
            f.write(json.dumps(metrics | {"confusion_matrix": None}) + "\n")
        if self.cfg.eval.save_best and metrics["miou"] > self.best_miou:
            self.best_miou = metrics["miou"]
            ckpt.save_student(models.student_module, self.run_dir / "best_val_G.pth", student_meta(self.cfg))
            ckpt.atomic_write_text(self.run_dir / "best_val.json", json.dumps(
                metrics | {"selection": "best-val (chosen on the val set: optimistic)"}, indent=2))


def finish_run(cfg: RunConfig, info: DistInfo, run_dir: Path, models: Models, engine: Engine,
               validation: Validation) -> None:
    """Final weights (as the original names them), curves, and the final-iteration val evaluation."""
    last_step = cfg.optim.num_steps - 1
    final_name = ckpt.student_filename(cfg.data.dataset, last_step)
    if info.distributed:
        # Every rank states what it holds, so a divergence between processes is visible in the log.
        print(f"rank {info.rank}/{info.world_size}: student sha256 "
              f"{ckpt.state_dict_digest(ckpt.export_state_dict(models.student_module))}", flush=True)
        barrier()
    if not info.is_main:
        return
    ckpt.save_student(models.student_module, run_dir / final_name, student_meta(cfg))
    if models.discriminator is not None:
        ckpt.atomic_save(models.discriminator.state_dict(), run_dir / final_name.replace("_G.pth", "_D.pth"))
    print(f"student saved: {run_dir / final_name}")
    if (run_dir / "metrics.jsonl").exists():
        from cwdseg.viz.curves import plot_training_curves

        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=cfg.output.name)
    cost = write_cost(run_dir, run_cost_from_folder(run_dir))  # images, FLOPs, device-seconds, memory
    if cfg.eval.final:
        metrics = validation.run(models, engine, last_step, "final-iteration")
        metrics["checkpoint"] = str(run_dir / final_name)
        ckpt.atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        print(f"final-iteration val mIoU {100 * metrics['miou']:.2f} %  ({run_dir / 'eval.json'})")
        validation.track(models, engine, last_step, metrics)
    if validation.trackers:
        validation.trackers.close()
    print(f"run folder: {run_dir}  (config.json, metrics.jsonl, curves.png, last.pth, {final_name}, {cost.name}"
          f"{', eval.json' if cfg.eval.final else ''})")
    if cfg.output.demo:
        demo_epilogue(cfg, run_dir / final_name)


def demo_epilogue(cfg: RunConfig, student: Path) -> None:
    """The demo's last lines: what it was (a random teacher) and the next commands."""
    data = f" --dataset {cfg.data.dataset}" if cfg.data.dataset != "cityscapes" else ""
    teacher = ("the teacher had RANDOM weights, so this student learnt nothing from it; "
               if cfg.needs_teacher and cfg.models.teacher_ckpt == "random" else "")
    print(f"demo finished: {teacher}real runs need a trained teacher and the real dataset (README: Quick start).\n"
          f"next: python evaluate.py --restore-from {student} --data-dir {cfg.data.root}{data}\n"
          f"      python predict.py --restore-from {student} --input {val_images(cfg)} "
          "--output-dir outputs/demo_predict\n"
          f"      python tools/export.py {student.parent} --out-dir outputs/demo_export")


def val_images(cfg: RunConfig) -> str:
    """A folder of val images of the dataset (where predict.py finds images), for the demo's hint."""
    root = Path(cfg.data.root)
    for sub in ("leftImg8bit/val", "images/validation", "val", "JPEGImages", "images"):
        first = next((p for p in sorted((root / sub).rglob("*")) if p.suffix in (".png", ".jpg")), None)
        if first is not None:
            return str(first.parent)
    return str(root)


def log_model_pair(cfg: RunConfig, log) -> None:
    """Say once what the pair of architectures implies: the resize of the distilled maps, a knowingly
    mismatched normalisation."""
    if not cfg.needs_teacher:
        return
    m = cfg.models
    if maps_differ(m.teacher_arch, m.student_arch, cfg.data.crop_size):
        log(f"note: the teacher {m.teacher_arch} and the student {m.student_arch} give maps of different sizes; "
            "the distillation terms resize the student's maps to the teacher's (bilinear)")
    if m.teacher_normalization != m.student_normalization:
        log(f"WARNING: --allow-normalization-mismatch: the teacher (trained on {m.teacher_normalization} input) "
            f"is fed the student's {m.student_normalization} input")
