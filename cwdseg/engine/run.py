"""The pieces of a training run that ``cwdseg.cli.train.main`` calls in order: seeding, the batch split,
the demo data, resume, the config record, the train loader, validation and the final save/evaluation."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from cwdseg import checkpoint as ckpt
from cwdseg.data.cityscapes import build_loader
from cwdseg.data.registry import build_dataset
from cwdseg.data.sampling import TrainSampleStream
from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.engine.build import Engine, Models, maps_differ
from cwdseg.engine.distributed import DistInfo, barrier
from cwdseg.engine.runlog import code_version
from cwdseg.engine.state import jsonable, load_last, write_config as record_config
from cwdseg.evaluation.loop import build_eval_dataset, build_eval_loader, evaluate_model
from cwdseg.models import canonical_arch

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


def per_rank_batch(args: argparse.Namespace, info: DistInfo) -> int:
    per_rank, rem = divmod(args.batch_size, info.world_size * args.grad_accum)
    if rem or per_rank == 0:
        raise RunSetupError(f"--batch-size {args.batch_size} does not split into {info.world_size} processes x "
                         f"--grad-accum {args.grad_accum}; choose a batch size divisible by their product")
    return per_rank


def prepare_demo_data(args: argparse.Namespace, info: DistInfo) -> None:
    root = Path(args.data_dir)
    if args.dataset == "cityscapes" and (root / "leftImg8bit").is_dir():
        return
    if args.dataset != "cityscapes" and (root / "synthetic.json").is_file():
        return
    if info.is_main:
        if args.dataset == "cityscapes":
            from cwdseg.data.synthetic import generate

            print(f"demo: generating the synthetic Cityscapes-format dataset in {root}", flush=True)
            generate(root, **DEMO_DATASET)
        else:
            from cwdseg.data.synthetic_zoo import generate_dataset

            print(f"demo: generating a synthetic {args.dataset} dataset in its official layout in {root}", flush=True)
            generate_dataset(args.dataset, root, n_train=24, n_val=6, n_test=4, seed=0)
    barrier()


def resume_step(args: argparse.Namespace, run_dir: Path, models: Models, opt_g, opt_d, engine: Engine, log) -> int:
    """The step to start from: 0, or the one stored in --resume / the run folder's last.pth."""
    last_path = run_dir / "last.pth"
    resume_from = Path(args.resume) if args.resume else (last_path if last_path.exists() else None)
    if args.resume and not resume_from.exists():
        raise RunSetupError(f"--resume {args.resume}: no such file")
    if resume_from is None:
        return 0
    step = load_last(resume_from, models, opt_g, opt_d, engine, args)
    log(f"resumed from {resume_from} at step {step}/{args.num_steps}")
    return step


def write_config(args: argparse.Namespace, info: DistInfo, run_dir: Path, per_rank: int, start_step: int) -> None:
    config = {k: jsonable(v) for k, v in vars(args).items()}
    config.update(code_version=code_version(), torch_version=torch.__version__, world_size=info.world_size,
                  per_rank_batch=per_rank, device=str(info.device))
    record_config(run_dir, config, start_step)  # a resume appends a record instead of rewriting


def build_train_loader(args: argparse.Namespace, info: DistInfo, per_rank: int, start_step: int):
    train_set = build_dataset(
        args.dataset, args.data_dir, "train", args.data_list, crop_size=args.input_size,
        random_scale=args.random_scale, random_mirror=args.random_mirror, ignore_label=args.ignore_label,
        cache_images=args.cache_images, verbose=info.is_main, image_cache=args.image_cache,
        normalization=NORMALIZATIONS[args.student_normalization],
    )
    stream = TrainSampleStream(len(train_set), seed=args.seed, rank=info.rank, world_size=info.world_size,
                               start=start_step * per_rank * args.grad_accum)
    return build_loader(train_set, batch_size=per_rank, sampler=stream, num_workers=args.num_workers,
                        drop_last=True, generator=torch.Generator().manual_seed(args.seed))


def next_micro_batches(data_iter, args: argparse.Namespace, engine: Engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--grad-accum`` (images, labels) pairs, on the device in the engine's memory format."""
    non_blocking = engine.device.type == "cuda"
    mem = torch.channels_last if engine.channels_last else torch.contiguous_format
    micro = []
    for _ in range(args.grad_accum):
        images, labels, _names = next(data_iter)
        micro.append((images.to(engine.device, non_blocking=non_blocking, memory_format=mem),
                      labels.to(engine.device, non_blocking=non_blocking).long()))
    return micro


class Validation:
    """Val evaluations of the student during and after training (the val loader is built once, on first use)."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args, self.run_dir, self.loader, self.best_miou = args, run_dir, None, -1.0

    def run(self, models: Models, engine: Engine, step: int, tag: str) -> dict:
        if self.loader is None:
            val_set = build_eval_dataset(self.args.data_dir, "val", self.args.data_listval,
                                         ignore_label=self.args.ignore_label, dataset=self.args.dataset,
                                         normalization=NORMALIZATIONS[self.args.student_normalization])
            self.loader = build_eval_loader(val_set, batch_size=1, num_workers=min(self.args.num_workers, 2))
        metrics = evaluate_model(models.student_module, self.loader, num_classes=self.args.num_classes,
                                 device=engine.device, amp=self.args.amp, progress=sys.stdout.isatty())
        metrics.update({"step": step, "selection": tag, "run": self.args.save_name, "seed": self.args.seed,
                        "preset": self.args.preset, "distill": self.args.distill_terms})
        return metrics

    def intermediate(self, models: Models, engine: Engine, step: int, log) -> None:
        metrics = self.run(models, engine, step - 1, "intermediate")
        log(f"step {step}: val mIoU {100 * metrics['miou']:.2f}")
        with open(self.run_dir / "eval_history.jsonl", "a") as f:
            f.write(json.dumps(metrics | {"confusion_matrix": None}) + "\n")
        if self.args.save_best and metrics["miou"] > self.best_miou:
            self.best_miou = metrics["miou"]
            ckpt.save_student(models.student_module, self.run_dir / "best_val_G.pth")
            ckpt.atomic_write_text(self.run_dir / "best_val.json", json.dumps(
                metrics | {"selection": "best-val (chosen on the val set: optimistic)"}, indent=2))


def finish_run(args: argparse.Namespace, info: DistInfo, run_dir: Path, models: Models, engine: Engine,
               validation: Validation) -> None:
    """Final weights (as the original names them), curves, and the final-iteration val evaluation."""
    final_name = f"city_{args.num_steps - 1}_G.pth"
    if info.distributed:
        # Every rank states what it holds, so a divergence between processes is visible in the log.
        print(f"rank {info.rank}/{info.world_size}: student sha256 "
              f"{ckpt.state_dict_digest(ckpt.export_state_dict(models.student_module))}", flush=True)
        barrier()
    if not info.is_main:
        return
    ckpt.save_student(models.student_module, run_dir / final_name)
    if models.discriminator is not None:
        ckpt.atomic_save(models.discriminator.state_dict(), run_dir / f"city_{args.num_steps - 1}_D.pth")
    print(f"student saved: {run_dir / final_name}")
    if (run_dir / "metrics.jsonl").exists():
        from cwdseg.viz.curves import plot_training_curves

        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=args.save_name)
    if args.eval:
        metrics = validation.run(models, engine, args.num_steps - 1, "final-iteration")
        metrics["checkpoint"] = str(run_dir / final_name)
        ckpt.atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
        print(f"final-iteration val mIoU {100 * metrics['miou']:.2f}  ({run_dir / 'eval.json'})")
    print(f"run folder: {run_dir}  (config.json, metrics.jsonl, curves.png, last.pth, {final_name}"
          f"{', eval.json' if args.eval else ''})")


def log_model_pair(args: argparse.Namespace, log) -> None:
    """Say once what the pair of architectures implies: the resize of the distilled maps, a knowingly
    mismatched normalisation."""
    if not args.distill_terms:
        return
    if maps_differ(args.teacher_arch, args.student_arch, args.input_size):
        log(f"note: the teacher {canonical_arch(args.teacher_arch)} and the student {canonical_arch(args.student_arch)} "
            "give maps of different sizes; the distillation terms resize the student's maps to the teacher's (bilinear)")
    if args.teacher_normalization != args.student_normalization:
        log(f"WARNING: --allow-normalization-mismatch: the teacher (trained on {args.teacher_normalization} input) "
            f"is fed the student's {args.student_normalization} input")
