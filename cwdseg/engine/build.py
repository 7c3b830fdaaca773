"""Building the parts of a run from its configuration: models, loss criteria and weights, optimisers, engine."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwdseg import checkpoint as ckpt
from cwdseg.config import RunConfig
from cwdseg.distill import CriterionDSN
from cwdseg.distill.registry import build_term, connector_policy, method_of, taps_of
from cwdseg.distill.taps import TapRecorder
from cwdseg.engine.distributed import DistInfo
from cwdseg.engine.precision import AMP_DTYPES, autocast_context
from cwdseg.models import FEATURE_CHANNELS, arch_spec, build_model, canonical_arch, output_size
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
    channels: dict[tuple[str, str], int] = field(default_factory=dict)  # (role, tap) -> channels of that map
    student_aliases: dict[str, str] = field(default_factory=dict)  # tap aliases of each architecture (stage3, ...)
    teacher_aliases: dict[str, str] = field(default_factory=dict)

    def trainable_g(self) -> list[nn.Parameter]:
        params = list(self.student_module.parameters())
        if self.connector is not None:
            params += list(self.connector.parameters())
        return params


class DistillTerm(nn.Module):
    """One distillation term, whole: its loss module, weight, the taps it reads on the student and the
    teacher (``logits``, ``feature``, an architecture alias such as ``stage3``, or any module path) and
    its connector (student -> teacher channels) when it needs one. ``forward(taps_s, taps_t, labels)``
    is the weighted loss; every loss module takes the common call ``loss(student_map, teacher_map, labels)``.
    """

    def __init__(self, name: str, loss: nn.Module, weight: float, student_tap: str, teacher_tap: str,
                 connector: nn.Module | None = None) -> None:
        super().__init__()
        self.name, self.loss, self.weight = name, loss, float(weight)
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.connector = connector

    def extra_repr(self) -> str:
        return (f"{self.name}: weight={self.weight:g}, student_tap={self.student_tap!r}, "
                f"teacher_tap={self.teacher_tap!r}")

    def forward(self, taps_s: dict[str, torch.Tensor], taps_t: dict[str, torch.Tensor],
                labels: torch.Tensor | None) -> torch.Tensor:
        source = taps_s[self.student_tap]
        if self.connector is not None:
            source = self.connector(source)
        return self.weight * self.loss(source, taps_t[self.teacher_tap], labels)


@dataclass
class Criteria:
    dsn: CriterionDSN
    terms: nn.ModuleDict = field(default_factory=nn.ModuleDict)   # name -> DistillTerm, in the spec's order (not adv)

    def taps(self, role: str) -> list[str]:
        """The taps the terms read on the student (``role="s"``) or the teacher (``"t"``), each once."""
        names = [term.student_tap if role == "s" else term.teacher_tap for term in self.terms.values()]
        return list(dict.fromkeys(names))

    def own_parameters(self, models: Models) -> list[nn.Parameter]:
        """Trainable parts the terms own beyond the connectors (generators, projection heads)."""
        known = {id(p) for p in models.trainable_g()}
        return [p for p in self.terms.parameters() if id(p) not in known]


@dataclass
class Weights:
    terms: dict[str, float] = field(default_factory=dict)  # name -> weight of each term of Criteria.terms
    adv: float = 0.0
    d: float = 0.0
    gp: float = 0.0

    def record(self) -> dict[str, dict[str, float]]:
        """``{"weights": {term: weight}}`` for each metrics line
        (adv: lambda_adv, d_*: lambda_d, lambda_d*lambda_gp)."""
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


STANDARD_TAPS = ("logits", "feature")


def tap_channels(cfg: RunConfig, student: nn.Module, teacher: nn.Module | None) -> dict[tuple[str, str], int]:
    """``{(role, tap): channels}`` of every tap the terms read (role ``s`` student, ``t`` teacher): the
    logits and head feature from the registry, any other tap measured by one small forward (eval mode,
    CPU, 64x64) with hooks; an unknown tap is a one-line TapError naming the available ones."""
    out: dict[tuple[str, str], int] = {}
    wanted: dict[str, list[str]] = {"s": [], "t": []}
    for name, options in cfg.distill.terms.items():
        if name == "adv":
            continue
        for role, tap in zip("st", taps_of(name, options)):
            arch = cfg.models.student_arch if role == "s" else cfg.models.teacher_arch
            if tap == "logits":
                out[(role, tap)] = cfg.data.num_classes
            elif tap == "feature":
                out[(role, tap)] = FEATURE_CHANNELS[arch]
            elif tap not in wanted[role]:
                wanted[role].append(tap)
    for role, model in (("s", student), ("t", teacher)):
        if not wanted[role] or model is None:
            continue
        arch = cfg.models.student_arch if role == "s" else cfg.models.teacher_arch
        was_training = model.training
        with TapRecorder(model.eval(), wanted[role], aliases=arch_spec(arch).taps) as rec, torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
        model.train(was_training)
        out.update({(role, tap): int(rec.taps[tap].shape[1]) for tap in wanted[role]})
    return out


def named_tap_channels(cfg: RunConfig) -> dict[tuple[str, str], int]:
    """:func:`tap_channels` without models at hand: the two networks are built (CPU, random weights) only
    when a term reads a tap other than the logits and the head feature."""
    named = any(tap not in STANDARD_TAPS for name, options in cfg.distill.terms.items() if name != "adv"
                for tap in taps_of(name, options))
    if not named:
        return tap_channels(cfg, None, None)
    return tap_channels(cfg, build_model(cfg.models.student_arch, cfg.data.num_classes),
                        build_model(cfg.models.teacher_arch, cfg.data.num_classes))


def build_connectors(cfg: RunConfig, channels: dict[tuple[str, str], int] | None = None) -> nn.ModuleDict | None:
    """A connector (student -> teacher channels) for each term that asks for one: always (CWD on the
    feature, as the original; FitNet's regressor), or only when the channel counts differ (PI on features;
    every term on a named tap). ``channels``: :func:`tap_channels` of the run's models (default:
    :func:`named_tap_channels`, which builds models only when a term reads a named tap)."""
    channels = named_tap_channels(cfg) if channels is None else channels
    connectors = nn.ModuleDict()
    for name, options in cfg.distill.terms.items():
        if name == "adv" or method_of(name).needs_channels:  # those terms own their alignment layers
            continue
        s_tap, t_tap = taps_of(name, options)
        policy = connector_policy(name, options)
        if s_tap not in STANDARD_TAPS or t_tap not in STANDARD_TAPS:
            policy = policy or "if_channels_differ"
        s_ch, t_ch = channels[("s", s_tap)], channels[("t", t_tap)]
        if policy == "always" or (policy == "if_channels_differ" and s_ch != t_ch):
            if method_of(name).connector_kind == "conv":
                connectors[name] = nn.Conv2d(s_ch, t_ch, kernel_size=1, bias=False)
            else:
                connectors[name] = FeatureConnector(s_ch, t_ch)
    return connectors if len(connectors) else None


def warn_loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def build_models(cfg: RunConfig, info: DistInfo, log) -> Models:
    device, m, num_classes = info.device, cfg.models, cfg.data.num_classes
    student = build_model(m.student_arch, num_classes)
    if m.student_init == RANDOM:
        if info.is_main:
            warn_loud("the student starts from RANDOM weights (no ImageNet initialisation); "
                      f"published numbers need {default_imagenet_init(m.student_arch)}")
    else:
        report = ckpt.load_imagenet_backbone(student, m.student_init, verbose=info.is_main)
        log(f"student initialised from {m.student_init}: "
            f"{len(report['loaded'])} tensors loaded, {len(report['skipped'])} skipped")

    teacher = None
    if cfg.needs_teacher:
        teacher = build_model(m.teacher_arch, num_classes)
        if m.teacher_ckpt == RANDOM:
            if info.is_main:
                warn_loud("the teacher has RANDOM weights: the distillation terms teach nothing useful. "
                          f"This is for smoke tests and the demo; pass --teacher-ckpt {default_teacher_hint(cfg)} "
                          "for real runs")
        else:
            ckpt.load_teacher(teacher, m.teacher_ckpt)
            log(f"teacher ({m.teacher_arch}) loaded from {m.teacher_ckpt}")
        teacher.eval().requires_grad_(False)

    channels = tap_channels(cfg, student, teacher) if cfg.needs_teacher else {}
    connector = build_connectors(cfg, channels)
    # only when used (bug fix)
    discriminator = Discriminator(in_channels=num_classes) if "adv" in cfg.distill.terms else None

    mem = torch.channels_last if cfg.engine.channels_last else torch.contiguous_format
    for module in (student, teacher, connector, discriminator):
        if module is not None:
            module.to(device=device, memory_format=mem)
    if info.distributed:
        # Statistics over the whole global batch, as InPlaceABNSync; works on NCCL and gloo.
        convert_sync_abn(student)
        if connector is not None:
            convert_sync_abn(connector)
        student = sync_batch_norm(student, device, log)
    student_module = student
    if cfg.engine.compile:
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
    return Models(student, student_module, teacher, connector, discriminator, channels,
                  dict(arch_spec(cfg.models.student_arch).taps), dict(arch_spec(cfg.models.teacher_arch).taps))


def default_teacher_hint(cfg: RunConfig) -> str:
    """The teacher file a real run of this dataset would name (the original's for Cityscapes)."""
    return "ckpt/teacher_city.pth" if cfg.data.dataset == "cityscapes" else f"ckpt/teacher_{cfg.data.dataset}.pth"


def build_criteria(cfg: RunConfig, models: Models, device: torch.device | None = None) -> tuple[Criteria, Weights]:
    """The distillation terms of the spec as :class:`DistillTerm` objects (``--distill``/``--preset`` and the
    original flags, which are spec entries: ``--cwd`` is ``cwd`` [on the feature with ``--cwd-feat``],
    ``--kd`` is ``kd``, ``--adv`` is ``adv``), each with its connector (``models.connector``) and, for the
    terms that own trainable layers, those layers sized by the tapped maps. Every term resizes the student
    map to the teacher's size when the two differ (architectures can be a pixel apart)."""
    ignore_label, num_classes = cfg.data.ignore_label, cfg.data.num_classes
    criteria = Criteria(dsn=CriterionDSN(ignore_index=ignore_label))
    weights = Weights()
    for name, options in cfg.distill.terms.items():
        if name == "adv":
            weights.adv, weights.d, weights.gp = options["weight"], options["d"], options["gp"]
            continue
        s_tap, t_tap = taps_of(name, options)
        widths = {}
        if method_of(name).needs_channels:
            widths = dict(student_channels=models.channels[("s", s_tap)],
                          teacher_channels=models.channels[("t", t_tap)])
        loss = build_term(name, options, num_classes, ignore_label, **widths)
        connector = models.connector[name] if models.connector is not None and name in models.connector else None
        criteria.terms[name] = DistillTerm(name, loss, options["weight"], s_tap, t_tap, connector)
        weights.terms[name] = options["weight"]
    if device is not None:
        criteria.terms.to(device)
    return criteria, weights


def default_imagenet_init(arch: str) -> str:
    """Where the ImageNet initialisation of ``arch``'s backbone is expected: ``ckpt/<backbone>-imagenet.pth``
    (``resnet18`` / ``resnet101`` deep stem, CSAIL's = CIRKD's file; ``mobilenetv2``, CIRKD's); for SegFormer
    the ``nvidia/mit-b<N>`` folder as Hugging Face ships it, ``ckpt/mit-b<N>``."""
    name = canonical_arch(arch)
    if arch_spec(name).family == "segformer":
        return f"ckpt/mit-{name.split('_', 1)[1]}"
    return f"ckpt/{name.split('_', 1)[1]}-imagenet.pth"


def maps_differ(teacher_arch: str, student_arch: str, input_size: tuple[int, int]) -> bool:
    """Whether the two networks' output maps differ in size for crops of ``input_size``."""
    return output_size(teacher_arch, input_size) != output_size(student_arch, input_size)


def model_pair_problems(cfg: RunConfig) -> list[str]:
    """What is wrong with the teacher/student pair (empty: nothing). Checks that the two take the same
    input normalisation (unless ``allow_normalization_mismatch``) and that the discriminator (``adv``)
    gets teacher and student maps of the same size (the distillation terms resize the student map to
    the teacher's; the critic compares two samples of one distribution, so it does not)."""
    if not cfg.needs_teacher:
        return []
    m, crop = cfg.models, cfg.data.crop_size
    problems = []
    t_norm, s_norm = m.teacher_normalization, m.student_normalization
    if t_norm != s_norm and not m.allow_normalization_mismatch:
        problems.append(
            f"the teacher {m.teacher_arch} expects {t_norm} input but the student {m.student_arch} expects {s_norm}: "
            "the data pipeline can give only one; pick a pair trained with the same normalisation, or pass "
            f"--allow-normalization-mismatch to feed the teacher the student's {s_norm} input knowingly")
    if "adv" in cfg.distill.terms and maps_differ(m.teacher_arch, m.student_arch, crop):
        t_hw, s_hw = output_size(m.teacher_arch, crop), output_size(m.student_arch, crop)
        problems.append(
            f"the adversarial term (--adv) scores teacher and student logits of one size, but at --input-size "
            f"{crop[0]},{crop[1]} the teacher {m.teacher_arch} gives {t_hw[0]}x{t_hw[1]} maps and the student "
            f"{m.student_arch} {s_hw[0]}x{s_hw[1]}; drop --adv (the other terms resize) or use a same-family pair")
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


def head_prefixes(arch: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the decode head of ``arch`` (for ``optim.head_lr_mult``)."""
    spec = arch_spec(arch)
    given = getattr(spec, "head_prefixes", None)
    if given:
        return tuple(given)
    return ("pspmodule.", "head.", "dsn.") if spec.family == "cwd" else ("head.", "auxlayer.")


def build_optimizers(cfg: RunConfig, models: Models,
                     criteria: Criteria | None = None) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """SGD (the recipe) or AdamW for the student and connectors; Adam for the discriminator.

    With ``head_lr_mult`` 1 there is one parameter group: the connector's learning rate follows the
    schedule too (the original never decayed it because it only updated param_groups[0]), and weight
    decay applies to every parameter, as there. Otherwise the decode head (and the connectors) form a
    second group whose ``lr_mult`` the schedule multiplies in (SegFormer's recipe: 10)."""
    o = cfg.optim
    own = criteria.own_parameters(models) if criteria is not None else []  # e.g. MGD's generator
    params: list = models.trainable_g() + own
    if o.head_lr_mult != 1.0:
        prefixes = head_prefixes(cfg.models.student_arch)
        named = list(models.student_module.named_parameters())
        encoder = [p for n, p in named if not n.startswith(prefixes)]
        head = [p for n, p in named if n.startswith(prefixes)]
        head += (list(models.connector.parameters()) if models.connector is not None else []) + own
        params = [{"params": encoder, "lr_mult": 1.0}, {"params": head, "lr_mult": o.head_lr_mult}]
    if o.optimizer == "adamw":
        opt_g = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:
        opt_g = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    opt_d = None
    if models.discriminator is not None:
        opt_d = torch.optim.Adam(models.discriminator.parameters(), lr=o.lr_d, betas=(0.9, 0.99))
    return opt_g, opt_d


def build_engine(cfg: RunConfig, info: DistInfo) -> Engine:
    """How the step runs; the precision, memory format and determinism were resolved with the configuration."""
    device, e = info.device, cfg.engine

    def autocast():
        return autocast_context(device, AMP_DTYPES[e.amp])

    scaler = torch.amp.GradScaler(device.type, enabled=e.amp == "fp16")
    return Engine(device, autocast, scaler, e.channels_last, info)
