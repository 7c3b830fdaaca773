"""Train a PSPNet-R18 student on Cityscapes with channel-wise distillation (CWD) from a PSPNet-R101 teacher.

The defaults are the original recipe (TorchDistiller ``SemSeg-distill``): 40000 steps, batch 8,
512x512 random crops, SGD lr 0.01 / momentum 0.9 / weight decay 5e-4, poly(0.9), teacher in eval mode.
``exp_cwd.sh`` maps the original eight positional arguments onto the flags below.

    python train.py --demo                         # synthetic data, a few minutes on a CPU
    bash exp_cwd.sh channel kl 3 4 False False False v1
    torchrun --nproc_per_node=4 train.py --cwd True ...

Read top to bottom: arguments -> build -> resume -> loop (``train_step``) -> save -> evaluate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


from cwdseg import checkpoint as ckpt
from cwdseg.cli.recipes import RECIPES
from cwdseg.data import DatasetError
from cwdseg.data.registry import DATASETS, dataset_info
from cwdseg.data.cityscapes import default_num_workers
from cwdseg.distill.registry import PRESETS, TERM_NAMES, DistillSpecError, resolve_spec, spec_run_name
from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.engine.build import RANDOM, build_criteria, build_engine, build_models, build_optimizers, \
    resolve_model_args
from cwdseg.engine.distributed import DeviceError, barrier, cleanup, init_distributed
from cwdseg.engine.precision import AMP_CHOICES
from cwdseg.engine.runlog import RunLog, StepWindow, peak_tflops
from cwdseg.engine import runlock
from cwdseg.engine.signals import STOP_SIGNAL_CHOICES, StopRequest, resume_hint
from cwdseg.engine.state import save_last
from cwdseg.engine.run import RunSetupError, Validation, build_train_loader, finish_run, log_model_pair, next_micro_batches, \
    per_rank_batch, prepare_demo_data, resume_step, seed_everything, write_config
from cwdseg.engine.step import poly_lr, set_lr, train_step
from cwdseg.cli.checks import train_value_errors
from cwdseg.evaluation.loop import EvaluationError
from cwdseg.models import ARCH_NAMES, PAPER_PAIR, canonical_arch
from cwdseg.models.summary import training_step_flops

__all__ = ["get_args_parser", "resolve_args", "main", "cli", "poly_lr"]


# --------------------------------------------------------------------------------------------------
# Arguments
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
    p = argparse.ArgumentParser(
        description="Channel-wise knowledge distillation for semantic segmentation (PSPNet-R101 -> PSPNet-R18).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    flag = dict(type=str2bool, nargs="?", const=True, metavar="True|False")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=os.environ.get("DATASET", "cityscapes"), choices=sorted(DATASETS),
                   help="dataset layout and labels (from $DATASET when set)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="per-dataset defaults (crop, batch, steps, lr, ...; see README); typed flags still win")
    g.add_argument("--data-dir", default=None,
                   help="dataset root; default $DATA_DIR, else $CITYSCAPES or data/cityscapes for cityscapes, "
                        "data/<dataset> otherwise")
    g.add_argument("--data-list", default=None, help="train list file (image<TAB>label); none: scan the train split")
    g.add_argument("--data-listval", default=None, help="val list file; none: scan the val split")
    g.add_argument("--input-size", type=input_size, default=(512, 512), help="random crop H,W")
    g.add_argument("--random-mirror", default=False, **flag, help="random horizontal flip (off in the recipe)")
    g.add_argument("--random-scale", default=False, **flag, help="random scale 0.7..2.1 (off in the recipe)")
    g.add_argument("--cache-images", default=False, **flag, help="keep decoded training images in RAM")
    g.add_argument("--image-cache", default=None, metavar="DIR",
                   help="decoded training images memory-mapped from DIR, built there on first use "
                        "(or by `python -m cwdseg.data cache`); shared by all processes of a machine")
    g.add_argument("--num-workers", type=int, default=default_num_workers(),
                   help="data loader processes; the default fits this machine's cores")
    g.add_argument("--num_classes", "--num-classes", dest="num_classes", type=int, default=None,
                   help="classes of the networks; default: the dataset's (must agree when given)")
    g.add_argument("--ignore-label", type=int, default=255)

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="images per optimiser step, summed over processes")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (same effective batch)")
    g.add_argument("--num-steps", type=int, default=40000)
    g.add_argument("--lr-g", type=float, default=0.01, help="SGD learning rate of the student (and connector)")
    g.add_argument("--lr-d", type=float, default=4e-4, help="Adam learning rate of the discriminator")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--power", type=float, default=0.9, help="poly learning-rate decay power")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("distillation")
    g.add_argument("--cwd", default=False, **flag, help="channel-wise distillation")
    g.add_argument("--cwd-feat", default=False, **flag,
                   help="CWD on the head feature (PSP / DeepLabV3 head) through a 1x1 connector instead of on the logits")
    g.add_argument("--norm-type", default="channel", choices=["channel", "spatial", "channel_mean", "none"])
    g.add_argument("--divergence", default="kl", choices=["kl", "mse"])
    g.add_argument("--temperature", type=float, default=4.0, help="CWD temperature (forced to 1 with mse)")
    g.add_argument("--lambda-cwd", type=float, default=3.0)
    g.add_argument("--cwd-ignore-mask", default=False, **flag,
                   help="extension: leave pixels labelled --ignore-label out of CWD (off in the original)")
    g.add_argument("--kd", default=False, **flag, help="pixel-wise KD on the logits")
    g.add_argument("--lambda-kd", type=float, default=10.0)
    g.add_argument("--adv", default=False, **flag, help="holistic adversarial distillation (WGAN-GP)")
    g.add_argument("--lambda-adv", type=float, default=0.001, help="generator adversarial weight")
    g.add_argument("--lambda-d", type=float, default=0.1, help="discriminator loss weight")
    g.add_argument("--lambda-gp", type=float, default=10.0, help="gradient-penalty weight (times lambda-d)")
    g.add_argument("--distill", nargs="+", default=None, metavar="NAME=WEIGHT[,OPTION=VALUE]",
                   help="distillation terms with their weights, e.g. cwd=3 kd=10 at_feat=10000; terms: "
                        + ", ".join(TERM_NAMES) + " (README: Comparing methods)")
    g.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="a recipe of the paper's Table 2 (or a later method); --distill adds or re-weights terms")

    g = p.add_argument_group("models")
    g.add_argument("--T_ckpt_path", "--teacher-ckpt", dest="T_ckpt_path", default="ckpt/teacher_city.pth",
                   help=f"teacher weights; '{RANDOM}' for a random teacher (smoke tests only)")
    g.add_argument("--teacher-arch", default="resnet101", choices=ARCH_NAMES,
                   help="teacher network (resnet101 = pspnet_resnet101, the paper's)")
    g.add_argument("--student-arch", default="resnet18", choices=ARCH_NAMES,
                   help="student network (resnet18 = pspnet_resnet18, the paper's)")
    g.add_argument("--teacher-normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="input normalisation the teacher's weights expect; none: the architecture's")
    g.add_argument("--student-normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="input normalisation of the student (and of the data); none: the architecture's")
    g.add_argument("--allow-normalization-mismatch", action="store_true",
                   help="accept a teacher whose normalisation differs from the student's (it sees the student's input)")
    g.add_argument("--is-student-load-imgnet", default=True, **flag, help="initialise the student from ImageNet")
    g.add_argument("--student-pretrain-model-imgnet", "--student-init", dest="student_pretrain_model_imgnet",
                   default=None,
                   help="deep-stem ImageNet weights of the student's backbone; none: ckpt/<backbone>-imagenet.pth "
                        f"(resnet18, resnet101, mobilenetv2); '{RANDOM}' for random init")

    g = p.add_argument_group("outputs and run control")
    g.add_argument("--save-dir", default="ckpt", help="runs are written to SAVE_DIR/SAVE_NAME/")
    g.add_argument("--save-name", default=None, help="run name; none: built like exp_cwd.sh's")
    g.add_argument("--exp-name", default=None,
                   help="run name built by exp_cwd.sh; the architectures are appended when they are not the paper's pair")
    g.add_argument("--save-every", "--save-ckpt-every", dest="save_every", type=int, default=0,
                   help="also write city_<step>_G.pth every N steps (0: only at the end, as the original)")
    g.add_argument("--save-last-every", type=int, default=500,
                   help="write the resumable last.pth every N steps (and at the end, and on a stop signal)")
    g.add_argument("--stop-signal", default="USR1", choices=STOP_SIGNAL_CHOICES,
                   help="a scheduler's early-warning signal (e.g. Slurm --signal=USR1@120): like SIGTERM and "
                        "Ctrl-C, it saves last.pth after the current step and exits")
    g.add_argument("--force", action="store_true", help="finish a run that is already complete again")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on val every N steps (0: only at the end)")
    g.add_argument("--save-best", default=False, **flag,
                   help="keep the best-val student as best_val_G.pth (labelled as selected on val)")
    g.add_argument("--eval", default=True, **flag, help="evaluate the final student on val")
    g.add_argument("--resume", default=None, help="resume from this last.pth; none: SAVE_DIR/SAVE_NAME/last.pth when it exists")
    g.add_argument("--log-every", type=int, default=20, help="steps between metric lines")
    g.add_argument("--demo", action="store_true",
                   help="small run on the built-in synthetic dataset (generated if missing); minutes on a CPU")

    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--gpu", default=None, help="the original's GPU index: the same as --device cuda:N")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast precision; auto = bf16 on a GPU that has it, none on CPU")
    g.add_argument("--channels-last", default=None, **flag, help="NHWC memory format (default: on GPU)")
    g.add_argument("--compile", default=False, **flag, help="torch.compile the student and teacher")
    g.add_argument("--deterministic", default=None, **flag,
                   help="deterministic algorithms (default: on CPU, where resumes are then bitwise exact)")
    return p


# What --demo changes, unless the flag was given on the command line.
DEMO_SETTINGS: dict[str, Any] = dict(
    data_dir="data/synthetic", input_size=(96, 96), batch_size=4, num_steps=120, cwd=True,
    T_ckpt_path=RANDOM, is_student_load_imgnet=False, num_workers=2, save_last_every=40, log_every=10,
)


def default_data_dir(dataset: str) -> str:
    """``$DATA_DIR``, else ``$CITYSCAPES`` or ``data/cityscapes`` for cityscapes, else ``data/<dataset>``."""
    if os.environ.get("DATA_DIR"):
        return os.environ["DATA_DIR"]
    if dataset == "cityscapes":
        return os.environ.get("CITYSCAPES", "data/cityscapes")
    return f"data/{dataset}"


def resolve_num_classes(args: argparse.Namespace) -> None:
    """``--num-classes`` from the dataset (``folder``: its classes.json); a contradicting value is an error."""
    info = dataset_info(args.dataset, args.data_dir)
    if args.num_classes is None:
        args.num_classes = info.num_classes
    elif args.num_classes != info.num_classes:
        raise DatasetError(f"--num-classes {args.num_classes} contradicts --dataset {args.dataset}, which has "
                           f"{info.num_classes} classes ({', '.join(info.class_names[:5])}, ...); drop --num-classes")


def format_number(x: float) -> str:
    return f"{x:g}"


def default_run_name(args: argparse.Namespace) -> str:
    """Same shape as exp_cwd.sh's ``${KD}_${ADV}_${FEAT}_${NORM}_${DIVERGENCE}_${WEIGHT}_${TEMPERATURE}_${VERSION}``."""
    if args.demo:
        name = "demo" if args.distill_terms else "demo_baseline"
        return name if args.dataset == "cityscapes" else f"{name}_{args.dataset}"  # one run folder per layout
    if args.preset or args.distill:
        return spec_run_name(args.distill_terms, args.preset)
    if not (args.cwd or args.kd or args.adv):
        return "baseline"
    version = "train"
    return "_".join([str(args.kd), str(args.adv), str(args.cwd_feat), args.norm_type, args.divergence,
                     format_number(args.lambda_cwd), format_number(args.temperature), version])


def arch_tag(args: argparse.Namespace) -> str:
    """``""`` for the paper's PSPNet-R101 -> PSPNet-R18 (or a PSPNet-R18 baseline), else
    ``_T-<teacher>_S-<student>`` (``_S-<student>`` without a teacher), for run names."""
    student = canonical_arch(args.student_arch)
    if not (args.cwd or args.kd or args.adv):
        return "" if student == PAPER_PAIR[1] else f"_S-{student}"
    teacher = canonical_arch(args.teacher_arch)
    return "" if (teacher, student) == PAPER_PAIR else f"_T-{teacher}_S-{student}"


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.recipe:
        # The recipe's values become the defaults, so a flag typed on the command line still wins.
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    if args.demo:
        # The demo's values become the defaults, so a flag typed on the command line still wins.
        parser.set_defaults(**DEMO_SETTINGS, **({"cwd": False} if args.distill or args.preset else {}))
        args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = default_data_dir(args.dataset)
    elif args.demo and args.data_dir == DEMO_SETTINGS["data_dir"] and args.dataset != "cityscapes":
        args.data_dir = f"{DEMO_SETTINGS['data_dir']}_{args.dataset}"  # one synthetic root per layout
    try:
        args.distill_terms = resolve_spec(args)  # {name: {"weight": w, options}}: --preset, --distill, --cwd/--kd/--adv
    except DistillSpecError as exc:
        parser.error(str(exc))
    if args.num_classes is None and args.dataset != "folder":
        # Known without reading any file; a folder dataset's count comes from its classes.json in main.
        args.num_classes = dataset_info(args.dataset).num_classes
    if args.save_name is None:
        args.save_name = (args.exp_name or default_run_name(args)) + arch_tag(args)
    errors = resolve_model_args(args)
    if args.cwd_feat and not args.cwd:
        errors.append("--cwd-feat True needs --cwd True (it selects where CWD is applied)")
    if args.divergence == "mse" and args.temperature != 1.0:
        print(f"note: --divergence mse uses temperature 1 (as the original); --temperature {args.temperature} ignored")
        args.temperature = 1.0
    for name in ("batch_size", "num_steps", "grad_accum", "save_last_every", "log_every"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "num_workers"):
        if getattr(args, name) < 0:
            errors.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    errors += train_value_errors(args)
    if errors:
        parser.error("; ".join(errors))
    return args


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    info = init_distributed(args.device, args.gpu)
    engine = build_engine(args, info)
    run_dir = Path(args.save_dir) / args.save_name
    if args.demo:
        prepare_demo_data(args, info)
    resolve_num_classes(args)
    seed_everything(args.seed, args.deterministic, info.device)
    per_rank = per_rank_batch(args, info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    runlock.acquire_for_run(run_dir, info)  # one run per folder; released at exit
    log = RunLog(None, 0, 0, enabled=info.is_main)  # plain messages until the loop starts
    if not args.force and (done := runlock.completed_message(run_dir, args)):
        log(done)
        return 0
    if info.distributed or args.grad_accum > 1:
        log(f"batch {args.batch_size} per step = {info.world_size} process(es) x {args.grad_accum} micro-batch(es) "
            f"x {per_rank} images (the recipe's effective batch is kept)")

    # build -> resume
    models = build_models(args, info, log)
    criteria, weights = build_criteria(args)
    log_model_pair(args, log)
    opt_g, opt_d = build_optimizers(args, models)
    start_step = resume_step(args, run_dir, models, opt_g, opt_d, engine, log)
    if info.is_main:
        write_config(args, info, run_dir, per_rank, start_step)
    loader = build_train_loader(args, info, per_rank, start_step)
    stop = StopRequest().install(args.stop_signal)
    flops = training_step_flops(args.student_arch, args.teacher_arch if models.teacher is not None else None,
                                args.input_size, args.batch_size)
    validation = Validation(args, run_dir)
    last_path = run_dir / "last.pth"

    # loop
    log.close()
    log = RunLog(run_dir, args.num_steps, start_step, enabled=info.is_main)
    window = StepWindow(args.batch_size, flops, peak_tflops(info.device))
    data_iter = iter(loader) if start_step < args.num_steps else None
    step = start_step
    try:
        while step < args.num_steps:
            lr_g = set_lr(opt_g, opt_d, args, step)
            t0 = time.perf_counter()
            micro = next_micro_batches(data_iter, args, engine)
            window.data_seconds += time.perf_counter() - t0
            terms = train_step(micro, models, criteria, weights, opt_g, opt_d, engine)
            step += 1
            window.add(terms)
            if step % args.log_every == 0 or step == args.num_steps or step == start_step + 1:
                log.metrics(window.record(step, args.num_steps, lr_g, info.device) | weights.record(), window.steps)
                window.reset()
            if info.is_main and args.save_every and step % args.save_every == 0 and step < args.num_steps:
                ckpt.save_student(models.student_module, run_dir / f"city_{step - 1}_G.pth")
            stopping = stop.agreed(step, args.log_every, info)
            if info.is_main and (step % args.save_last_every == 0 or step == args.num_steps or stopping):
                save_last(last_path, step, models, opt_g, opt_d, engine, args, step * per_rank * args.grad_accum)
            if stopping:
                log(f"{stop.signal_name}: saved {last_path} at step {step}/{args.num_steps}; {resume_hint()}")
                barrier()
                return 0
            if args.eval_every and step % args.eval_every == 0 and step < args.num_steps:
                if info.is_main:
                    validation.intermediate(models, engine, step, log)
                barrier()
    finally:
        stop.restore()  # past the loop, Ctrl-C interrupts as usual (the final save and evaluation)
        log.close()

    # save -> evaluate
    finish_run(args, info, run_dir, models, engine, validation)
    barrier()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with one-line errors (exit status 2) instead of tracebacks for
    the problems a user fixes (a missing or wrong file, a bad dataset folder, a device flag)."""
    try:
        return main(argv)
    except (ckpt.CheckpointError, DatasetError, DeviceError, EvaluationError, runlock.RunLockError,
            RunSetupError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: aborted; last.pth is as last saved (a save in progress was discarded)", file=sys.stderr)
        return 130
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(cli())
