"""Train a segmentation student with knowledge distillation; the defaults are the CWD paper's recipe.

The paper's recipe (TorchDistiller ``SemSeg-distill``): PSPNet-R101 -> PSPNet-R18 on Cityscapes, 40000
steps, batch 8, 512x512 random crops, SGD lr 0.01 / momentum 0.9 / weight decay 5e-4, poly(0.9), teacher
in eval mode. ``exp_cwd.sh`` maps the original eight positional arguments onto the flags below; recipe
files (``configs/``) and ``--set`` reach every field of the run configuration (``cwdseg.config``).

    python train.py --demo                         # synthetic data, about a minute on a CPU
    python train.py --config configs/cityscapes/cd_logits.yaml --set optim.num_steps=20000
    bash exp_cwd.sh channel kl 3 4 False False False v1
    torchrun --nproc_per_node=4 train.py --cwd True ...

Read top to bottom: configuration -> build -> resume -> loop (``train_step``) -> save -> evaluate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from cwdseg import checkpoint as ckpt
from cwdseg.cli.checks import train_value_errors
from cwdseg.cli.parser import ArgumentParser
from cwdseg.cli.train_config import RECIPE_NAMES, build_config, config_yaml, default_for
from cwdseg.config import ConfigError, RunConfig, to_dict
from cwdseg.data import DatasetError
from cwdseg.data.registry import DATASETS
from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.distill.registry import PRESETS, TERM_NAMES, DistillSpecError
from cwdseg.distill.taps import TapError
from cwdseg.engine import runlock
from cwdseg.engine.build import (
    RANDOM,
    build_criteria,
    build_engine,
    build_models,
    build_optimizers,
    model_pair_problems,
)
from cwdseg.engine.distributed import DeviceError, barrier, cleanup, init_distributed
from cwdseg.engine.precision import AMP_CHOICES
from cwdseg.engine.run import (
    RunSetupError,
    Validation,
    build_trackers,
    build_train_loader,
    check_teacher_first,
    finish_run,
    log_model_pair,
    next_micro_batches,
    prepare_run,
    removed_on_failure,
    resume_step,
    student_meta,
    write_config,
)
from cwdseg.engine.runlog import RunLog, StepWindow, peak_tflops
from cwdseg.engine.signals import STOP_SIGNAL_CHOICES, StopRequest, resume_hint
from cwdseg.engine.state import save_last
from cwdseg.engine.step import poly_lr, set_lr, train_step
from cwdseg.engine.trackers import TrackerError, log_to_arg
from cwdseg.evaluation.loop import EvaluationError
from cwdseg.evaluation.teacher_check import TeacherCheckError
from cwdseg.models import ARCH_NAMES
from cwdseg.models.summary import training_step_flops

__all__ = ["get_args_parser", "resolve_config", "main", "cli", "poly_lr"]


# --------------------------------------------------------------------------------------------------
# Arguments: every flag is optional and unset unless typed, so the layers below it (recipe files,
# --recipe, --demo) decide what it was not given; --help shows the value of the paper's recipe.
# --------------------------------------------------------------------------------------------------
def str2bool(value: str | bool) -> bool:
    """The original's True/False strings (and the usual spellings)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y", "t"):
        return True
    if v in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def input_size(value: str) -> tuple[int, int]:
    """``H,W`` as the original's ``--input-size 512,512``."""
    try:
        h, w = (int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W such as 512,512, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"crop size must be positive, got {value!r}")
    return h, w


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Knowledge distillation for semantic segmentation: any registered teacher -> student, "
                    "15+ distillation terms, recipe files (configs/) and the original CWD flags.",
        formatter_class=DefaultsFromConfig, allow_abbrev=False, argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("configuration")
    g.add_argument("--config", action="append", metavar="FILE.yaml",
                   help="recipe file (configs/..., or a run's config.json); several are merged in order")
    g.add_argument("--set", nargs="+", metavar="SECTION.FIELD=VALUE",
                   help="override any field of the configuration, e.g. optim.lr=0.02 data.crop_size=[64,64]")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as a recipe file and exit")
    flag = dict(type=str2bool, nargs="?", const=True, metavar="True|False")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="dataset layout and labels (from $DATASET when set)")
    g.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="per-dataset defaults (crop, batch, steps, lr, ...; see README); typed flags still win")
    g.add_argument("--data-dir",
                   help="dataset root; default $DATA_DIR, else $CITYSCAPES or data/cityscapes for cityscapes, "
                        "data/<dataset> otherwise")
    g.add_argument("--data-list", help="train list file (image<TAB>label); none: scan the train split")
    g.add_argument("--data-listval", help="val list file; none: scan the val split")
    g.add_argument("--input-size", type=input_size, help="random crop H,W")
    g.add_argument("--random-mirror", **flag, help="random horizontal flip (off in the recipe)")
    g.add_argument("--random-scale", **flag, help="random scale 0.7..2.1 (off in the recipe)")
    g.add_argument("--cache-images", **flag, help="keep decoded training images in RAM")
    g.add_argument("--image-cache", metavar="DIR",
                   help="decoded training images memory-mapped from DIR, built there on first use "
                        "(or by `python -m cwdseg.data cache`); shared by all processes of a machine")
    g.add_argument("--num-workers", type=int,
                   help="data loader processes; the default fits this machine's cores")
    g.add_argument("--num_classes", "--num-classes", dest="num_classes", type=int,
                   help="classes of the networks; default: the dataset's (must agree when given)")
    g.add_argument("--ignore-label", type=int, help="label value left out of the loss and the metric")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="images per optimiser step, summed over processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (same effective batch)")
    g.add_argument("--num-steps", type=int, help="optimiser steps")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), help="sgd (the recipe) or adamw (SegFormer's)")
    g.add_argument("--lr-g", type=float, help="SGD learning rate of the student (and connector)")
    g.add_argument("--lr-d", type=float, help="Adam learning rate of the discriminator")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, help="weight decay of every parameter")
    g.add_argument("--power", type=float, help="poly learning-rate decay power")
    g.add_argument("--seed", type=int, help="seed of the weights, the data order and the augmentation")

    g = p.add_argument_group("distillation")
    g.add_argument("--cwd", **flag, help="channel-wise distillation")
    g.add_argument("--cwd-feat", **flag,
                   help="CWD on the head feature (PSP / DeepLabV3 head) through a 1x1 connector "
                        "instead of on the logits")
    g.add_argument("--norm-type", choices=["channel", "spatial", "channel_mean", "none"])
    g.add_argument("--divergence", choices=["kl", "mse"])
    g.add_argument("--temperature", type=float, help="CWD temperature (forced to 1 with mse)")
    g.add_argument("--lambda-cwd", type=float, help="CWD weight")
    g.add_argument("--cwd-ignore-mask", **flag,
                   help="extension: leave pixels labelled --ignore-label out of CWD (off in the original)")
    g.add_argument("--kd", **flag, help="pixel-wise KD on the logits")
    g.add_argument("--lambda-kd", type=float, help="pixel-wise KD weight")
    g.add_argument("--adv", **flag, help="holistic adversarial distillation (WGAN-GP)")
    g.add_argument("--lambda-adv", type=float, help="generator adversarial weight")
    g.add_argument("--lambda-d", type=float, help="discriminator loss weight")
    g.add_argument("--lambda-gp", type=float, help="gradient-penalty weight (times lambda-d)")
    g.add_argument("--distill", nargs="+", metavar="NAME=WEIGHT[,OPTION=VALUE]",
                   help="distillation terms with their weights, e.g. cwd=3 kd=10 at_feat=10000; terms: "
                        + ", ".join(TERM_NAMES) + " (README: Comparing methods)")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="a recipe of the paper's Table 2 (or a later method); --distill adds or re-weights terms")

    g = p.add_argument_group("models")
    g.add_argument("--T_ckpt_path", "--teacher-ckpt", dest="T_ckpt_path",
                   help=f"teacher weights; '{RANDOM}' for a random teacher (smoke tests only)")
    g.add_argument("--teacher-arch", choices=ARCH_NAMES,
                   help="teacher network (resnet101 = pspnet_resnet101, the paper's)")
    g.add_argument("--student-arch", choices=ARCH_NAMES,
                   help="student network (resnet18 = pspnet_resnet18, the paper's)")
    g.add_argument("--teacher-normalization", choices=sorted(NORMALIZATIONS),
                   help="input normalisation the teacher's weights expect; none: the architecture's")
    g.add_argument("--student-normalization", choices=sorted(NORMALIZATIONS),
                   help="input normalisation of the student (and of the data); none: the architecture's")
    g.add_argument("--allow-normalization-mismatch", action="store_true",
                   help="accept a teacher whose normalisation differs from the student's (it sees the student's input)")
    g.add_argument("--is-student-load-imgnet", **flag, help="initialise the student from ImageNet")
    g.add_argument("--student-pretrain-model-imgnet", "--student-init", dest="student_pretrain_model_imgnet",
                   help="deep-stem ImageNet weights of the student's backbone; none: ckpt/<backbone>-imagenet.pth "
                        f"(resnet18, resnet101, mobilenetv2); '{RANDOM}' for random init")

    g = p.add_argument_group("outputs and run control")
    g.add_argument("--save-dir", help="runs are written to SAVE_DIR/SAVE_NAME/")
    g.add_argument("--save-name", help="run name; none: built like exp_cwd.sh's")
    g.add_argument("--exp-name",
                   help="run name built by exp_cwd.sh; the architectures are appended when they are not "
                        "the paper's pair")
    g.add_argument("--save-every", "--save-ckpt-every", dest="save_every", type=int,
                   help="also write city_<step>_G.pth every N steps (0: only at the end, as the original)")
    g.add_argument("--save-last-every", type=int,
                   help="write the resumable last.pth every N steps (and at the end, and on a stop signal)")
    g.add_argument("--stop-signal", choices=STOP_SIGNAL_CHOICES,
                   help="a scheduler's early-warning signal (e.g. Slurm --signal=USR1@120): like SIGTERM and "
                        "Ctrl-C, it saves last.pth after the current step and exits")
    g.add_argument("--force", action="store_true", help="finish a run that is already complete again")
    g.add_argument("--eval-every", type=int, help="evaluate on val every N steps (0: only at the end)")
    g.add_argument("--save-best", **flag,
                   help="keep the best-val student as best_val_G.pth (labelled as selected on val)")
    g.add_argument("--eval", **flag, help="evaluate the final student on val")
    g.add_argument("--resume", help="resume from this last.pth; none: SAVE_DIR/SAVE_NAME/last.pth when it exists")
    g.add_argument("--log-every", type=int, help="steps between metric lines")
    g.add_argument("--log-to", type=log_to_arg, metavar="TRACKERS",
                   help="also log to tensorboard,mlflow,wandb (any subset; metrics.jsonl is always written)")
    g.add_argument("--teacher-check-images", type=int,
                   help="evaluate the teacher on the first N val images before the first step (0: off)")
    g.add_argument("--teacher-min-miou", type=float,
                   help="stop when the teacher's mIoU (percent) on those images is lower; default: see README")
    g.add_argument("--demo", action="store_true",
                   help="small run on the built-in synthetic dataset (configs/demo.yaml; generated if missing)")

    g = p.add_argument_group("engine")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--gpu", help="the original's GPU index: the same as --device cuda:N")
    g.add_argument("--amp", choices=AMP_CHOICES,
                   help="autocast precision; auto = bf16 on a GPU that has it, none on CPU")
    g.add_argument("--channels-last", **flag, help="NHWC memory format (default: on GPU)")
    g.add_argument("--compile", **flag, help="torch.compile the student and teacher")
    g.add_argument("--deterministic", **flag,
                   help="deterministic algorithms (default: on CPU, where resumes are then bitwise exact)")
    return p




class DefaultsFromConfig(argparse.HelpFormatter):
    """--help shows, for each flag, the value it has when no layer sets it (the paper's recipe)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        value = default_for(action.dest)
        if value is not None and action.option_strings and "%(default)" not in text:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            text += f" (default: {shown})"
        return text


# --------------------------------------------------------------------------------------------------
# The configuration, resolved once
# --------------------------------------------------------------------------------------------------
def typed_flags(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The flags given on the command line (and $DATASET), by argparse dest."""
    parser = parser or get_args_parser()
    typed = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    if "dataset" not in typed and os.environ.get("DATASET"):
        typed["dataset"] = os.environ["DATASET"]
    return typed


def resolve_config(argv: list[str] | None = None) -> RunConfig:
    """The run's configuration from the command line; every bad value is one line (exit status 2)."""
    parser = get_args_parser()
    typed = typed_flags(argv, parser)
    try:
        cfg = build_config(typed)
    except (ConfigError, DistillSpecError, DatasetError, DeviceError) as exc:
        parser.error(str(exc))
    errors = config_errors(cfg, typed)
    if errors:
        parser.error("; ".join(errors))
    return cfg


def resolve_config_data(data: RunConfig | dict | str | os.PathLike) -> RunConfig:
    """A configuration given in Python (a RunConfig, its dict, or a recipe file), resolved as train.py
    resolves ``--config``: missing fields filled, every value checked (ConfigError, one line)."""
    typed = {"config": [str(data)]} if isinstance(data, (str, os.PathLike)) else \
        {"config_data": [to_dict(data) if isinstance(data, RunConfig) else dict(data)]}
    try:
        cfg = build_config(typed)
    except (DistillSpecError, DatasetError, DeviceError) as exc:
        raise ConfigError(str(exc)) from None
    errors = config_errors(cfg, typed)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def config_errors(cfg: RunConfig, typed: dict[str, Any]) -> list[str]:
    """Every problem of a resolved configuration (and of the original flags as typed), one line each."""
    errors = model_pair_problems(cfg)
    if typed.get("cwd_feat") and not typed.get("cwd"):
        errors.append("--cwd-feat True needs --cwd True (it selects where CWD is applied)")
    if typed.get("divergence") == "mse" and typed.get("temperature", 1.0) != 1.0:
        print(f"note: --divergence mse uses temperature 1 (as the original); "
              f"--temperature {typed['temperature']} ignored")
    return errors + train_value_errors(cfg, typed)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, cfg: RunConfig | None = None, resume: str | None = None,
         force: bool = False) -> int:
    """Train the run ``cfg`` (a resolved configuration; default: resolved from ``argv``). ``--resume`` and
    ``--force`` (or ``resume``/``force``) act on this call only, they are not part of the run."""
    typed = typed_flags(argv) if cfg is None else {"resume": resume, "force": force}
    if typed.get("print_config"):
        print(config_yaml(resolve_config(argv)), end="")
        return 0
    cfg = cfg or resolve_config(argv)
    info = init_distributed(cfg.engine.device)
    engine = build_engine(cfg, info)
    cfg, per_rank, train_set, created = prepare_run(cfg, info)  # data, files and batch checked; folder + lock
    run_dir, o = cfg.run_dir, cfg.optim
    log = RunLog(None, 0, 0, enabled=info.is_main)  # plain messages until the loop starts
    if not typed.get("force") and (done := runlock.completed_message(run_dir, cfg)):
        log(done)
        return 0

    # build -> resume (a fresh folder that a failed start created is removed again)
    with removed_on_failure(run_dir, created, info):
        models = build_models(cfg, info, log)
        criteria, weights = build_criteria(cfg, models, info.device)
        log_model_pair(cfg, log)
        opt_g, opt_d = build_optimizers(cfg, models, criteria)
        start_step = resume_step(cfg, typed.get("resume"), run_dir, models, criteria, opt_g, opt_d, engine, log)
        if info.is_main:
            write_config(cfg, info, run_dir, per_rank, start_step)
            if start_step == 0:
                check_teacher_first(cfg, models, engine, run_dir, log)
        barrier()
    trackers = build_trackers(cfg, run_dir, start_step, info)
    loader = build_train_loader(cfg, train_set, info, per_rank, start_step)
    stop = StopRequest().install(cfg.output.stop_signal)
    flops = training_step_flops(cfg.models.student_arch, cfg.models.teacher_arch if models.teacher else None,
                                cfg.data.crop_size, o.batch_size)
    validation = Validation(cfg, run_dir, trackers)
    last_path = run_dir / "last.pth"

    # loop
    log.close()
    log = RunLog(run_dir, o.num_steps, start_step, enabled=info.is_main, trackers=trackers)
    window = StepWindow(o.batch_size, flops, peak_tflops(info.device))
    data_iter = iter(loader) if start_step < o.num_steps else None
    step, log_every = start_step, cfg.output.log_every
    try:
        while step < o.num_steps:
            lr_g = set_lr(opt_g, opt_d, o, step)
            t0 = time.perf_counter()
            micro = next_micro_batches(data_iter, o.grad_accum, engine, train_set.normalization)
            window.data_seconds += time.perf_counter() - t0
            terms = train_step(micro, models, criteria, weights, opt_g, opt_d, engine)
            step += 1
            window.add(terms)
            if step % log_every == 0 or step == o.num_steps or step == start_step + 1:
                log.metrics(window.record(step, o.num_steps, lr_g, info.device) | weights.record(), window.steps)
                window.reset()
            if info.is_main and cfg.output.save_every and step % cfg.output.save_every == 0 and step < o.num_steps:
                ckpt.save_student(models.student_module, run_dir / ckpt.student_filename(cfg.data.dataset, step - 1),
                                  student_meta(cfg))
            stopping = stop.agreed(step, log_every, info)
            if info.is_main and (step % cfg.output.save_last_every == 0 or step == o.num_steps or stopping):
                save_last(last_path, step, models, criteria, opt_g, opt_d, engine, cfg, step * per_rank * o.grad_accum)
            if stopping:
                log(f"{stop.signal_name}: saved {last_path} at step {step}/{o.num_steps}; {resume_hint()}")
                barrier()
                return 0
            if cfg.eval.every and step % cfg.eval.every == 0 and step < o.num_steps:
                if info.is_main:
                    validation.intermediate(models, engine, step, log)
                barrier()
    finally:
        stop.restore()  # past the loop, Ctrl-C interrupts as usual (the final save and evaluation)
        log.close()

    # save -> evaluate
    finish_run(cfg, info, run_dir, models, engine, validation)
    barrier()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with one-line errors (exit status 2) instead of tracebacks for
    the problems a user fixes (a missing or wrong file, a bad dataset folder, a device flag)."""
    try:
        return main(argv)
    except (ckpt.CheckpointError, DatasetError, DeviceError, EvaluationError, runlock.RunLockError,
            RunSetupError, ConfigError, TeacherCheckError, TrackerError, TapError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: aborted; last.pth is as last saved (a save in progress was discarded)", file=sys.stderr)
        return 130
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(cli())
