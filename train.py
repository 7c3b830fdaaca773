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
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataset import CityscapesDataset, DatasetError
from dataset.cityscapes import build_loader
from evaluate import EvaluationError, build_eval_dataset, build_eval_loader, evaluate_model
from libs import convert_sync_abn
from networks import PSP_FEATURE_CHANNELS, build_model
from networks.connector import FeatureConnector
from networks.discriminator import MIN_INPUT_SIZE, Discriminator
from utils import checkpoint as ckpt
from utils.distributed import (
    AMP_CHOICES,
    AMP_DTYPES,
    DeviceError,
    DistInfo,
    average_buffers,
    average_gradients,
    barrier,
    cleanup,
    init_distributed,
    peak_memory_mb,
    resolve_amp,
)
from utils.losses import (
    CriterionCWD,
    CriterionDSN,
    CriterionKD,
    discriminator_wgan_gp_loss,
    generator_adversarial_loss,
)
from utils.sampling import TrainSampleStream

RANDOM = "random"  # value of --teacher-ckpt / --student-init that asks for random weights explicitly
CHECKPOINT_HELP = (
    "download the released files listed in README.md ('Checkpoints') into ckpt/, or point the flag at your copy"
)
# Peak dense bf16 tensor throughput, for model-FLOPs utilisation; unknown devices report TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


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
    g.add_argument("--data-dir", default=os.environ.get("CITYSCAPES", "data/cityscapes"),
                   help="Cityscapes root (leftImg8bit/, gtFine/), from $CITYSCAPES when set")
    g.add_argument("--data-list", default=None, help="train list file (image<TAB>label); none: scan the train split")
    g.add_argument("--data-listval", default=None, help="val list file; none: scan the val split")
    g.add_argument("--input-size", type=input_size, default=(512, 512), help="random crop H,W")
    g.add_argument("--random-mirror", default=False, **flag, help="random horizontal flip (off in the recipe)")
    g.add_argument("--random-scale", default=False, **flag, help="random scale 0.7..2.1 (off in the recipe)")
    g.add_argument("--cache-images", default=False, **flag, help="keep decoded training images in RAM")
    g.add_argument("--num-workers", type=int, default=4, help="data loader processes")
    g.add_argument("--num_classes", "--num-classes", dest="num_classes", type=int, default=19)
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
                   help="CWD on the PSP feature through a 1x1 connector instead of on the logits")
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

    g = p.add_argument_group("models")
    g.add_argument("--T_ckpt_path", "--teacher-ckpt", dest="T_ckpt_path", default="ckpt/teacher_city.pth",
                   help=f"teacher weights; '{RANDOM}' for a random teacher (smoke tests only)")
    g.add_argument("--teacher-arch", default="resnet101", choices=["resnet101", "resnet18"])
    g.add_argument("--is-student-load-imgnet", default=True, **flag, help="initialise the student from ImageNet")
    g.add_argument("--student-pretrain-model-imgnet", "--student-init", dest="student_pretrain_model_imgnet",
                   default="ckpt/resnet18-imagenet.pth",
                   help=f"CSAIL deep-stem ResNet-18 ImageNet weights; '{RANDOM}' for random init")

    g = p.add_argument_group("outputs and run control")
    g.add_argument("--save-dir", default="ckpt", help="runs are written to SAVE_DIR/SAVE_NAME/")
    g.add_argument("--save-name", default=None, help="run name; none: built like exp_cwd.sh's")
    g.add_argument("--save-every", "--save-ckpt-every", dest="save_every", type=int, default=0,
                   help="also write city_<step>_G.pth every N steps (0: only at the end, as the original)")
    g.add_argument("--save-last-every", type=int, default=500,
                   help="write the resumable last.pth every N steps (and at the end, and on SIGTERM)")
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
DEMO_DATASET = dict(n_train=24, n_val=6, n_test=4, size=(256, 512), seed=0)


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the options the user typed (so --demo overrides only the rest)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def format_number(x: float) -> str:
    return f"{x:g}"


def default_run_name(args: argparse.Namespace) -> str:
    """Same shape as exp_cwd.sh's ``${KD}_${ADV}_${FEAT}_${NORM}_${DIVERGENCE}_${WEIGHT}_${TEMPERATURE}_${VERSION}``."""
    if args.demo:
        return "demo" if args.cwd or args.kd or args.adv else "demo_baseline"
    if not (args.cwd or args.kd or args.adv):
        return "baseline"
    version = "train"
    return "_".join([str(args.kd), str(args.adv), str(args.cwd_feat), args.norm_type, args.divergence,
                     format_number(args.lambda_cwd), format_number(args.temperature), version])


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.demo:
        given = explicit_dests(parser, argv)
        for key, value in DEMO_SETTINGS.items():
            if key not in given:
                setattr(args, key, value)
    if args.save_name is None:
        args.save_name = default_run_name(args)
    errors = []
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
    if errors:
        parser.error("; ".join(errors))
    return args


# --------------------------------------------------------------------------------------------------
# Building the parts
# --------------------------------------------------------------------------------------------------
@dataclass
class Models:
    student: nn.Module                 # possibly DDP / compiled; `student_module` is the plain one
    student_module: nn.Module
    teacher: nn.Module | None = None
    connector: nn.Module | None = None
    discriminator: nn.Module | None = None

    def trainable_g(self) -> list[nn.Parameter]:
        params = list(self.student_module.parameters())
        if self.connector is not None:
            params += list(self.connector.parameters())
        return params


@dataclass
class Criteria:
    dsn: CriterionDSN
    cwd: CriterionCWD | None = None
    kd: CriterionKD | None = None
    cwd_ignore_mask: bool = False
    ignore_label: int = 255


@dataclass
class Weights:
    cwd: float = 0.0
    kd: float = 0.0
    adv: float = 0.0
    d: float = 0.0
    gp: float = 0.0


@dataclass
class Engine:
    """Everything about *how* the step runs, not *what* it computes."""

    device: torch.device
    autocast: Any                      # a context-manager factory
    scaler: torch.amp.GradScaler
    channels_last: bool
    dist: DistInfo
    grad_accum: int = 1
    cwd_feat: bool = False


def needs_teacher(args: argparse.Namespace) -> bool:
    return bool(args.cwd or args.kd or args.adv)


def warn_loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def build_models(args: argparse.Namespace, info: DistInfo, log) -> Models:
    device = info.device
    student = build_model("resnet18", args.num_classes)
    if not args.is_student_load_imgnet or args.student_pretrain_model_imgnet == RANDOM:
        if info.is_main:
            warn_loud("the student starts from RANDOM weights (no ImageNet initialisation); "
                      "the paper's numbers need ckpt/resnet18-imagenet.pth")
    else:
        report = ckpt.load_imagenet_backbone(student, args.student_pretrain_model_imgnet, verbose=info.is_main)
        log(f"student initialised from {args.student_pretrain_model_imgnet}: "
            f"{len(report['loaded'])} tensors loaded, {len(report['skipped'])} skipped")

    teacher = None
    if needs_teacher(args):
        teacher = build_model(args.teacher_arch, args.num_classes)
        if args.T_ckpt_path == RANDOM:
            if info.is_main:
                warn_loud("the teacher has RANDOM weights: the distillation terms teach nothing useful. "
                          "This is for smoke tests and the demo; pass --teacher-ckpt ckpt/teacher_city.pth for real runs")
        else:
            ckpt.load_teacher(teacher, args.T_ckpt_path)
            log(f"teacher ({args.teacher_arch}) loaded from {args.T_ckpt_path}")
        teacher.eval().requires_grad_(False)

    connector = None
    if args.cwd and args.cwd_feat:
        connector = FeatureConnector(PSP_FEATURE_CHANNELS["resnet18"], PSP_FEATURE_CHANNELS[args.teacher_arch])
    discriminator = Discriminator(in_channels=args.num_classes) if args.adv else None  # only when used (bug fix)

    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in (student, teacher, connector, discriminator):
        if m is not None:
            m.to(device=device, memory_format=mem)
    if info.distributed:
        # Statistics over the whole global batch, as InPlaceABNSync; works on NCCL and gloo.
        convert_sync_abn(student)
        if connector is not None:
            convert_sync_abn(connector)
    student_module = student
    if args.compile:
        student = torch.compile(student)
        if teacher is not None:
            teacher = torch.compile(teacher)
    if info.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        )
    return Models(student, student_module, teacher, connector, discriminator)


def build_criteria(args: argparse.Namespace) -> tuple[Criteria, Weights]:
    criteria = Criteria(dsn=CriterionDSN(ignore_index=args.ignore_label), cwd_ignore_mask=args.cwd_ignore_mask,
                        ignore_label=args.ignore_label)
    weights = Weights()
    if args.cwd:
        criteria.cwd = CriterionCWD(args.norm_type, args.divergence, args.temperature)
        weights.cwd = args.lambda_cwd
    if args.kd:
        criteria.kd = CriterionKD()
        weights.kd = args.lambda_kd
    if args.adv:
        weights.adv, weights.d, weights.gp = args.lambda_adv, args.lambda_d, args.lambda_gp
    return criteria, weights


def build_optimizers(args: argparse.Namespace, models: Models) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    # One parameter group: the connector's learning rate follows the schedule too (the original never
    # decayed it because it only updated param_groups[0]). Weight decay applies to every parameter, as there.
    opt_g = torch.optim.SGD(models.trainable_g(), lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_d = None
    if models.discriminator is not None:
        opt_d = torch.optim.Adam(models.discriminator.parameters(), lr=args.lr_d, betas=(0.9, 0.99))
    return opt_g, opt_d


def poly_lr(base_lr: float, step: int, num_steps: int, power: float) -> float:
    """The original schedule: ``base * (1 - step / num_steps) ** power``, starting at step 0."""
    return base_lr * (1.0 - step / num_steps) ** power


def build_engine(args: argparse.Namespace, info: DistInfo) -> Engine:
    device = info.device
    args.amp = resolve_amp(args.amp, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.deterministic is None:
        args.deterministic = device.type == "cpu"
    dtype = AMP_DTYPES[args.amp]

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return Engine(device, autocast, scaler, args.channels_last, info, args.grad_accum, args.cwd_feat)


# --------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------
def discriminator_input(logits: torch.Tensor) -> torch.Tensor:
    """The logits D scores, in fp32. The recipe's 512 crop gives 65x65 maps, D's design size; maps
    from crops under ~505 px are too small for its four stride-2 convs, so they are resized (bilinear)
    to 65x65 — a departure that only affects such small-crop runs (tests, the demo)."""
    logits = logits.float()
    if min(logits.shape[-2:]) < MIN_INPUT_SIZE:
        logits = F.interpolate(logits, size=(65, 65), mode="bilinear", align_corners=True)
    return logits


def train_step(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    models: Models,
    criteria: Criteria,
    weights: Weights,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    engine: Engine,
) -> dict[str, torch.Tensor]:
    """One optimiser step: teacher forward, student forward, loss terms, backward, step; then the
    discriminator step when adversarial. Returns the weighted loss terms (tensors; no host sync here).

    ``micro_batches`` holds ``grad_accum`` (images, labels) pairs already on the device.
    """
    models.student.train()
    if models.connector is not None:
        models.connector.train()
    opt_g.zero_grad(set_to_none=True)
    terms_sum: dict[str, torch.Tensor] = {}
    logits_pairs = []  # (student, teacher) logits, detached, for the discriminator step
    n_micro = len(micro_batches)

    for i, (images, labels) in enumerate(micro_batches):
        last = i == n_micro - 1
        sync = contextlib.nullcontext() if last or not hasattr(models.student, "no_sync") else models.student.no_sync()
        with sync:
            preds_t = None
            if models.teacher is not None:
                with torch.inference_mode(), engine.autocast():
                    out_t = models.teacher(images, aux=False)  # no loss uses the teacher's aux head
                # Inference tensors cannot be saved for backward: copy the two maps the losses use.
                preds_t = (out_t[0].clone(), out_t[2].clone() if engine.cwd_feat else None)
            with engine.autocast():
                preds_s = models.student(images)
                terms = {"ce": criteria.dsn(preds_s, labels)}
                if criteria.cwd is not None:
                    target_t = preds_t[1] if engine.cwd_feat else preds_t[0]
                    source_s = models.connector(preds_s[2]) if engine.cwd_feat else preds_s[0]
                    mask = None
                    if criteria.cwd_ignore_mask:
                        mask = CriterionCWD.mask_from_labels(labels, target_t.shape[-2:], criteria.ignore_label)
                    terms["cwd"] = weights.cwd * criteria.cwd(source_s, target_t, ignore_mask=mask)
                if criteria.kd is not None:
                    terms["kd"] = weights.kd * criteria.kd(preds_s[0], preds_t[0])
                if models.discriminator is not None:
                    # D runs in fp32 (its gradient penalty needs a double backward).
                    with torch.autocast(engine.device.type, enabled=False):
                        d_out = models.discriminator(discriminator_input(preds_s[0]))
                    terms["adv_g"] = weights.adv * generator_adversarial_loss(d_out)
                    logits_pairs.append((preds_s[0].detach(), preds_t[0]))
            total = sum(terms.values())
            engine.scaler.scale(total / n_micro).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / n_micro

    world = engine.dist.world_size
    if models.connector is not None:
        average_gradients(models.connector.parameters(), world)
    engine.scaler.step(opt_g)
    engine.scaler.update()

    if models.discriminator is not None:
        # The generator's adversarial forward left gradients in D: clear them before D's own step.
        opt_d.zero_grad(set_to_none=True)
        models.discriminator.train()
        for logits_s, logits_t in logits_pairs:
            d_loss, d_terms = discriminator_wgan_gp_loss(
                models.discriminator, discriminator_input(logits_s), discriminator_input(logits_t),
                lambda_d=weights.d, lambda_gp=weights.gp,
            )
            (d_loss / n_micro).backward()
            for k, v in d_terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / n_micro
        average_gradients(models.discriminator.parameters(), world)
        opt_d.step()
        average_buffers(models.discriminator, world)

    terms_sum["total"] = sum(v for k, v in terms_sum.items() if not k.startswith("d_"))
    return terms_sum


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------
RECIPE_KEYS = (
    "data_list", "input_size", "random_mirror", "random_scale", "num_classes", "ignore_label", "batch_size",
    "grad_accum", "num_steps", "lr_g", "lr_d", "momentum", "weight_decay", "power", "seed", "cwd", "cwd_feat",
    "norm_type", "divergence", "temperature", "lambda_cwd", "cwd_ignore_mask", "kd", "lambda_kd", "adv", "lambda_adv", "lambda_d",
    "lambda_gp", "teacher_arch", "amp",
)


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, step: int, models: Models, opt_g, opt_d, engine: Engine, args, samples_seen: int) -> None:
    state = {
        "format": "cwd-seg/last/1",
        "step": step,  # the next step to run
        "student": ckpt.export_state_dict(models.student_module),
        "connector": models.connector.state_dict() if models.connector is not None else None,
        "discriminator": models.discriminator.state_dict() if models.discriminator is not None else None,
        "optimizer_g": opt_g.state_dict(),
        "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
        "scaler": engine.scaler.state_dict(),
        "rng": rng_state(),
        "sampler": {"samples_per_rank": samples_seen, "world_size": engine.dist.world_size},
        "recipe": {k: _jsonable(getattr(args, k)) for k in RECIPE_KEYS},
    }
    ckpt.atomic_save(state, path)


def load_last(path: Path, models: Models, opt_g, opt_d, engine: Engine, args) -> int:
    """Restore everything from ``last.pth``; returns the step to continue from."""
    state = ckpt.load_checkpoint_dict(path)
    if state.get("format") != "cwd-seg/last/1":
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of this toolkit (no 'format' tag); "
                                   "released students are loaded with --student-init or evaluate.py --restore-from")
    saved = state["recipe"]
    now = {k: _jsonable(getattr(args, k)) for k in RECIPE_KEYS}
    diff = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in RECIPE_KEYS if saved.get(k) != now[k]]
    if diff:
        raise SystemExit(f"error: {path} was written by a run with other settings:\n  " + "\n  ".join(diff)
                         + "\nuse the same flags to resume, or another --save-name for a new run")
    if state["sampler"]["world_size"] != engine.dist.world_size:
        raise SystemExit(f"error: {path} was written with {state['sampler']['world_size']} processes, "
                         f"this run has {engine.dist.world_size}; resume with the same number of processes")
    models.student_module.load_state_dict(state["student"])
    if models.connector is not None:
        models.connector.load_state_dict(state["connector"])
    if models.discriminator is not None:
        models.discriminator.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["optimizer_g"])
    if opt_d is not None:
        opt_d.load_state_dict(state["optimizer_d"])
    engine.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------
class RunLog:
    """Rank 0 writes metrics.jsonl and a progress bar (or plain lines when not on a terminal)."""

    def __init__(self, run_dir: Path | None, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled and run_dir else None
        self.bar = None
        if enabled and run_dir is not None and sys.stdout.isatty():  # the bar belongs to the loop
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def metrics(self, record: dict[str, Any], steps_done: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        losses = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix_str(f"{losses} lr={record['lr']:.2e} {record['images_per_s']:.1f} img/s")
        else:
            tflops = record.get("tflops")
            extra = f" {tflops:.2f} TFLOP/s" if tflops is not None else ""
            print(f"step {record['step'] + 1}/{record['num_steps']} {losses} lr={record['lr']:.3e} "
                  f"{record['iter_ms']:.0f} ms/it (data {record['data_ms']:.0f} ms) "
                  f"{record['images_per_s']:.1f} img/s{extra} mem {record['peak_mem_mb']:.0f} MB "
                  f"eta {_fmt_time(record['eta_s'])}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM (cluster preemption) asks the loop to save last.pth and exit after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def prepare_demo_data(args: argparse.Namespace, info: DistInfo) -> None:
    root = Path(args.data_dir)
    if (root / "leftImg8bit").is_dir():
        return
    if info.is_main:
        from dataset.synthetic import generate

        print(f"demo: generating the synthetic Cityscapes-format dataset in {root}", flush=True)
        generate(root, **DEMO_DATASET)
    barrier()


def build_val_loader(args: argparse.Namespace):
    val_set = build_eval_dataset(args.data_dir, "val", args.data_listval, ignore_label=args.ignore_label)
    return build_eval_loader(val_set, batch_size=1, num_workers=min(args.num_workers, 2))


def run_evaluation(args, models: Models, engine: Engine, loader, step: int, tag: str) -> dict:
    metrics = evaluate_model(
        models.student_module, loader, num_classes=args.num_classes, device=engine.device,
        amp=args.amp, progress=sys.stdout.isatty(),
    )
    metrics.update({"step": step, "selection": tag, "run": args.save_name})
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    info = init_distributed(args.device, args.gpu)
    engine = build_engine(args, info)
    run_dir = Path(args.save_dir) / args.save_name
    if args.demo:
        prepare_demo_data(args, info)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=info.device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    per_rank, rem = divmod(args.batch_size, info.world_size * args.grad_accum)
    if rem or per_rank == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split into {info.world_size} processes x "
                         f"--grad-accum {args.grad_accum}; choose a batch size divisible by their product")

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    log = RunLog(None, 0, 0, enabled=info.is_main)  # plain messages until the loop starts
    if info.distributed or args.grad_accum > 1:
        log(f"batch {args.batch_size} per step = {info.world_size} process(es) x {args.grad_accum} micro-batch(es) "
            f"x {per_rank} images (the recipe's effective batch is kept)")

    train_set = CityscapesDataset(
        args.data_dir, "train", list_path=args.data_list, crop_size=args.input_size,
        random_scale=args.random_scale, random_mirror=args.random_mirror, ignore_label=args.ignore_label,
        cache_images=args.cache_images, verbose=info.is_main,
    )
    models = build_models(args, info, log)
    criteria, weights = build_criteria(args)
    opt_g, opt_d = build_optimizers(args, models)

    last_path = run_dir / "last.pth"
    start_step = 0
    resume_from = Path(args.resume) if args.resume else (last_path if last_path.exists() else None)
    if args.resume and not resume_from.exists():
        raise SystemExit(f"error: --resume {args.resume}: no such file")
    if resume_from is not None:
        start_step = load_last(resume_from, models, opt_g, opt_d, engine, args)
        log(f"resumed from {resume_from} at step {start_step}/{args.num_steps}")

    if info.is_main:
        config = {k: _jsonable(v) for k, v in vars(args).items()}
        config.update(code_version=code_version(), torch_version=torch.__version__, world_size=info.world_size,
                      per_rank_batch=per_rank, device=str(info.device))
        ckpt.atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")

    samples_per_step = per_rank * args.grad_accum
    stream = TrainSampleStream(len(train_set), seed=args.seed, rank=info.rank, world_size=info.world_size,
                               start=start_step * samples_per_step)
    loader = build_loader(train_set, batch_size=per_rank, sampler=stream, num_workers=args.num_workers,
                          drop_last=True, generator=torch.Generator().manual_seed(args.seed))

    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)

    from networks.summary import training_step_flops

    flops_per_step = training_step_flops(
        "resnet18", args.teacher_arch if models.teacher is not None else None, args.input_size, args.batch_size,
    )
    peak = peak_tflops(info.device)
    log.close()
    log = RunLog(run_dir, args.num_steps, start_step, enabled=info.is_main)
    best_miou = -1.0
    val_loader = None
    step = start_step
    data_iter = iter(loader) if start_step < args.num_steps else None
    window_start, window_data, window_steps, window_terms = time.perf_counter(), 0.0, 0, {}
    non_blocking = info.device.type == "cuda"
    mem = torch.channels_last if engine.channels_last else torch.contiguous_format
    try:
        while step < args.num_steps:
            lr_g = poly_lr(args.lr_g, step, args.num_steps, args.power)
            for group in opt_g.param_groups:
                group["lr"] = lr_g
            if opt_d is not None:
                for group in opt_d.param_groups:
                    group["lr"] = poly_lr(args.lr_d, step, args.num_steps, args.power)

            t0 = time.perf_counter()
            micro = []
            for _ in range(args.grad_accum):
                images, labels, _names = next(data_iter)
                micro.append((images.to(info.device, non_blocking=non_blocking, memory_format=mem),
                              labels.to(info.device, non_blocking=non_blocking).long()))
            window_data += time.perf_counter() - t0

            terms = train_step(micro, models, criteria, weights, opt_g, opt_d, engine)
            step += 1
            window_steps += 1
            for k, v in terms.items():  # summed on the device; read once per log line
                window_terms[k] = window_terms[k] + v if k in window_terms else v

            if step % args.log_every == 0 or step == args.num_steps or step == start_step + 1:
                # the only host sync of the loop: mean of each term over the steps since the last line
                values = {k: float(v) / window_steps for k, v in window_terms.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(f"non-finite loss at step {step}: {values}; lower --lr-g or use --amp none")
                elapsed = time.perf_counter() - window_start
                iter_s = elapsed / window_steps
                tflops = flops_per_step / iter_s / 1e12
                log.metrics({
                    "step": step - 1, "num_steps": args.num_steps, "loss": values, "lr": lr_g,
                    "images_per_s": args.batch_size / iter_s, "iter_ms": 1000 * iter_s,
                    "data_ms": 1000 * window_data / window_steps, "peak_mem_mb": peak_memory_mb(info.device),
                    "tflops": tflops, "mfu": tflops / peak if peak else None,
                    "eta_s": iter_s * (args.num_steps - step),
                }, window_steps)
                window_start, window_data, window_steps, window_terms = time.perf_counter(), 0.0, 0, {}

            if info.is_main and args.save_every and step % args.save_every == 0 and step < args.num_steps:
                ckpt.save_student(models.student_module, run_dir / f"city_{step - 1}_G.pth")
            stopping = stop.requested
            if info.distributed:
                # Every rank must stop at the same step. Agreeing costs a host sync, so it is done
                # on log steps only (a fraction of a second apart; preemption grace is much longer).
                stopping = False
                if step % args.log_every == 0:
                    flag = torch.tensor([float(stop.requested)], device=info.device)
                    torch.distributed.all_reduce(flag)
                    stopping = bool(flag.item())
            if info.is_main and (step % args.save_last_every == 0 or step == args.num_steps or stopping):
                save_last(last_path, step, models, opt_g, opt_d, engine, args, step * samples_per_step)
            if stopping:
                log(f"SIGTERM: saved {last_path} at step {step}; rerun the same command to resume")
                barrier()
                return 0
            if args.eval_every and step % args.eval_every == 0 and step < args.num_steps:
                if info.is_main:
                    if val_loader is None:  # built once, on first use
                        val_loader = build_val_loader(args)
                    metrics = run_evaluation(args, models, engine, val_loader, step - 1, "intermediate")
                    log(f"step {step}: val mIoU {100 * metrics['miou']:.2f}")
                    with open(run_dir / "eval_history.jsonl", "a") as f:
                        f.write(json.dumps(metrics | {"confusion_matrix": None}) + "\n")
                    if args.save_best and metrics["miou"] > best_miou:
                        best_miou = metrics["miou"]
                        ckpt.save_student(models.student_module, run_dir / "best_val_G.pth")
                        ckpt.atomic_write_text(run_dir / "best_val.json", json.dumps(
                            metrics | {"selection": "best-val (chosen on the val set: optimistic)"}, indent=2))
                barrier()
    finally:
        log.close()

    final_name = f"city_{args.num_steps - 1}_G.pth"
    if info.distributed:
        # Every rank states what it holds, so a divergence between processes is visible in the log.
        print(f"rank {info.rank}/{info.world_size}: student sha256 "
              f"{ckpt.state_dict_digest(ckpt.export_state_dict(models.student_module))}", flush=True)
        barrier()
    if info.is_main:
        ckpt.save_student(models.student_module, run_dir / final_name)
        if models.discriminator is not None:
            ckpt.atomic_save(models.discriminator.state_dict(), run_dir / f"city_{args.num_steps - 1}_D.pth")
        print(f"student saved: {run_dir / final_name}")
        if (run_dir / "metrics.jsonl").exists():
            from utils.plots import plot_training_curves

            plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=args.save_name)
        if args.eval:
            if val_loader is None:
                val_loader = build_val_loader(args)
            metrics = run_evaluation(args, models, engine, val_loader, args.num_steps - 1, "final-iteration")
            metrics["checkpoint"] = str(run_dir / final_name)
            ckpt.atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2) + "\n")
            print(f"final-iteration val mIoU {100 * metrics['miou']:.2f}  ({run_dir / 'eval.json'})")
        print(f"run folder: {run_dir}  (config.json, metrics.jsonl, curves.png, last.pth, {final_name}"
              f"{', eval.json' if args.eval else ''})")
    barrier()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with one-line errors (exit status 2) instead of tracebacks for
    the problems a user fixes (a missing or wrong file, a bad dataset folder, a device flag)."""
    try:
        return main(argv)
    except (ckpt.CheckpointError, DatasetError, DeviceError, EvaluationError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(cli())
