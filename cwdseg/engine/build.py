"""Building the parts of a run from its arguments: models, loss criteria and weights, optimisers, engine."""
from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwdseg import checkpoint as ckpt
from cwdseg.distill import CriterionDSN
from cwdseg.distill.registry import build_term, connector_policy, method_of, resolve_spec, tap_of
from cwdseg.engine.distributed import DistInfo
from cwdseg.engine.precision import AMP_DTYPES, autocast_context, resolve_amp
from cwdseg.models import FEATURE_CHANNELS, NORMALIZATION, build_model, canonical_arch, output_size
from cwdseg.models.abn import convert_sync_abn
from cwdseg.models.connector import FeatureConnector
from cwdseg.models.discriminator import Discriminator

RANDOM = "random"  # value of --teacher-ckpt / --student-init that asks for random weights explicitly


@dataclass
class Models:
    student: nn.Module                 # possibly DDP / compiled; `student_module` is the plain one
    student_module: nn.Module
    teacher: nn.Module | None = None
    connector: nn.ModuleDict | None = None   # {term name: connector} for the terms that need one
    discriminator: nn.Module | None = None

    def trainable_g(self) -> list[nn.Parameter]:
        params = list(self.student_module.parameters())
        if self.connector is not None:
            params += list(self.connector.parameters())
        return params


@dataclass
class Term:
    """One active distillation term: its loss ``loss(student_map, teacher_map, labels)`` and the tap
    (``"logits"``: preds[0], ``"feature"``: preds[2]) both maps come from."""

    loss: nn.Module
    tap: str


@dataclass
class Criteria:
    dsn: CriterionDSN
    terms: dict[str, Term] = field(default_factory=dict)   # name -> term, in the spec's order (not adv)
    ignore_label: int = 255

    @property
    def needs_teacher_feature(self) -> bool:
        return any(term.tap == "feature" for term in self.terms.values())


@dataclass
class Weights:
    terms: dict[str, float] = field(default_factory=dict)  # name -> weight of each term of Criteria.terms
    adv: float = 0.0
    d: float = 0.0
    gp: float = 0.0

    def record(self) -> dict[str, dict[str, float]]:
        """``{"weights": {term: weight}}`` for each metrics line (adv: lambda_adv, d_*: lambda_d, lambda_d*lambda_gp)."""
        extra = {"adv_g": self.adv, "d_wgan": self.d, "d_gp": self.d * self.gp} if self.adv or self.d else {}
        return {"weights": {**self.terms, **extra}}


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


def distill_spec(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run's resolved distillation spec (``train.resolve_args`` stores it as ``args.distill_terms``)."""
    spec = getattr(args, "distill_terms", None)
    return resolve_spec(args) if spec is None else spec


def needs_teacher(args: argparse.Namespace) -> bool:
    return bool(distill_spec(args))


def build_connectors(args: argparse.Namespace, student_arch: str) -> nn.ModuleDict | None:
    """A connector (student -> teacher channels) for each term that asks for one: always (CWD on the
    feature, as the original; FitNet's regressor) or only when the channel counts differ (PI on features)."""
    connectors = nn.ModuleDict()
    for name, options in distill_spec(args).items():
        policy = connector_policy(name, options)
        s_ch, t_ch = FEATURE_CHANNELS[student_arch], FEATURE_CHANNELS[args.teacher_arch]
        if policy == "always" or (policy == "if_channels_differ" and s_ch != t_ch):
            if method_of(name).connector_kind == "conv":
                connectors[name] = nn.Conv2d(s_ch, t_ch, kernel_size=1, bias=False)
            else:
                connectors[name] = FeatureConnector(s_ch, t_ch)
    return connectors if len(connectors) else None


def warn_loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def build_models(args: argparse.Namespace, info: DistInfo, log) -> Models:
    device = info.device
    student = build_model(args.student_arch, args.num_classes)
    if not args.is_student_load_imgnet or args.student_pretrain_model_imgnet == RANDOM:
        if info.is_main:
            warn_loud("the student starts from RANDOM weights (no ImageNet initialisation); "
                      f"published numbers need {default_imagenet_init(args.student_arch)}")
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

    connector = build_connectors(args, getattr(args, "student_arch", "resnet18"))
    discriminator = Discriminator(in_channels=args.num_classes) if "adv" in distill_spec(args) else None  # only when used (bug fix)

    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in (student, teacher, connector, discriminator):
        if m is not None:
            m.to(device=device, memory_format=mem)
    if info.distributed:
        # Statistics over the whole global batch, as InPlaceABNSync; works on NCCL and gloo.
        convert_sync_abn(student)
        if connector is not None:
            convert_sync_abn(connector)
        student = sync_batch_norm(student, device, log)
    student_module = student
    if args.compile:
        student = torch.compile(student)
        if teacher is not None:
            teacher = torch.compile(teacher)
    if info.distributed:
        # No buffer broadcast in forward (average_buffers keeps BN statistics equal); torch >= 2.13 spells
        # it forward_sync_buffers and warns on every rank for the old name. The init sync it keeps copies
        # rank 0's buffers, which equal every rank's (same seed).
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False})
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, **no_sync,
        )
    return Models(student, student_module, teacher, connector, discriminator)


def build_criteria(args: argparse.Namespace) -> tuple[Criteria, Weights]:
    """The loss modules and weights of the spec (``--distill``/``--preset`` and the original flags,
    which are spec entries: ``--cwd`` is ``cwd`` [on the feature with ``--cwd-feat``], ``--kd`` is
    ``kd``, ``--adv`` is ``adv``). Every term resizes the student map to the teacher's size when the
    two differ (architectures can be a pixel apart)."""
    criteria = Criteria(dsn=CriterionDSN(ignore_index=args.ignore_label), ignore_label=args.ignore_label)
    weights = Weights()
    for name, options in distill_spec(args).items():
        if name == "adv":
            weights.adv, weights.d, weights.gp = options["weight"], options["d"], options["gp"]
            continue
        criteria.terms[name] = Term(build_term(name, options, args.num_classes, args.ignore_label),
                                    tap_of(name, options))
        weights.terms[name] = options["weight"]
    return criteria, weights


def default_imagenet_init(arch: str) -> str:
    """Where the ImageNet initialisation of ``arch``'s backbone is expected: ``ckpt/<backbone>-imagenet.pth``
    (``resnet18`` / ``resnet101`` deep stem, CSAIL's = CIRKD's file; ``mobilenetv2``, CIRKD's)."""
    return f"ckpt/{canonical_arch(arch).split('_', 1)[1]}-imagenet.pth"


def maps_differ(teacher_arch: str, student_arch: str, input_size: tuple[int, int]) -> bool:
    """Whether the two networks' output maps differ in size for crops of ``input_size``."""
    return output_size(teacher_arch, input_size) != output_size(student_arch, input_size)


def resolve_model_args(args: argparse.Namespace) -> list[str]:
    """Fill the per-architecture defaults of ``args`` (the two normalisations, the ImageNet file of
    the student's backbone); returns :func:`model_pair_problems`."""
    args.teacher_normalization = args.teacher_normalization or NORMALIZATION[args.teacher_arch]
    args.student_normalization = args.student_normalization or NORMALIZATION[args.student_arch]
    if args.student_pretrain_model_imgnet is None:
        args.student_pretrain_model_imgnet = default_imagenet_init(args.student_arch)
    return model_pair_problems(args)


def model_pair_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the teacher/student pair of ``args`` (empty: nothing). Checks that the two
    take the same input normalisation (unless ``--allow-normalization-mismatch``) and that the
    discriminator (``adv``) gets teacher and student maps of the same size (the distillation terms resize
    the student map to the teacher's; the critic compares two samples of one distribution, so it does not)."""
    if not needs_teacher(args):
        return []
    problems = []
    t_norm, s_norm = args.teacher_normalization, args.student_normalization
    if t_norm != s_norm and not args.allow_normalization_mismatch:
        problems.append(
            f"the teacher {canonical_arch(args.teacher_arch)} expects {t_norm} input but the student "
            f"{canonical_arch(args.student_arch)} expects {s_norm}: the data pipeline can give only one; pick a pair "
            "trained with the same normalisation, or pass --allow-normalization-mismatch to feed the teacher the "
            f"student's {s_norm} input knowingly")
    if "adv" in distill_spec(args) and maps_differ(args.teacher_arch, args.student_arch, args.input_size):
        t_hw = output_size(args.teacher_arch, args.input_size)
        s_hw = output_size(args.student_arch, args.input_size)
        problems.append(
            f"the adversarial term (--adv) scores teacher and student logits of one size, but at --input-size {args.input_size[0]},{args.input_size[1]} "
            f"the teacher {canonical_arch(args.teacher_arch)} gives {t_hw[0]}x{t_hw[1]} maps and the student "
            f"{canonical_arch(args.student_arch)} {s_hw[0]}x{s_hw[1]}; drop --adv (the other terms resize) or use a same-family pair")
    return problems


def sync_batch_norm(student: nn.Module, device: torch.device, log) -> nn.Module:
    """Under DDP, the CIRKD-family students' ``nn.BatchNorm2d`` layers become ``nn.SyncBatchNorm``
    (as CIRKD trains them) on CUDA; SyncBatchNorm has no CPU kernel, so on CPU they stay per process."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in student.modules()):
        return student
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(student)
    log("note: BatchNorm2d statistics stay per process on CPU (SyncBatchNorm needs CUDA)")
    return student


def build_optimizers(args: argparse.Namespace, models: Models) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    # One parameter group: the connector's learning rate follows the schedule too (the original never
    # decayed it because it only updated param_groups[0]). Weight decay applies to every parameter, as there.
    opt_g = torch.optim.SGD(models.trainable_g(), lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_d = None
    if models.discriminator is not None:
        opt_d = torch.optim.Adam(models.discriminator.parameters(), lr=args.lr_d, betas=(0.9, 0.99))
    return opt_g, opt_d




def build_engine(args: argparse.Namespace, info: DistInfo) -> Engine:
    device = info.device
    args.amp = resolve_amp(args.amp, device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.deterministic is None:
        args.deterministic = device.type == "cpu"
    dtype = AMP_DTYPES[args.amp]

    def autocast():
        return autocast_context(device, dtype)

    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return Engine(device, autocast, scaler, args.channels_last, info, args.grad_accum, args.cwd_feat)


