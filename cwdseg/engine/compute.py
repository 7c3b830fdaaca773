"""What a training run costs: FLOPs per image and per step, images seen, device-seconds, peak memory.

Convention (the one of ``cwdseg.models.summary``; FLOPs = 2 x multiply-accumulates):
- the student runs forward + backward: 3 x its forward MACs (backward = the gradients for the inputs
  and for the weights, each about one forward), auxiliary head (dsn / auxlayer) included, since it is
  trained;
- the frozen teacher runs forward only, without its auxiliary head (train.py calls it with
  ``aux=False``): 1 x its forward MACs;
- each connector (student feature -> teacher channels) is trained like the student: 3 x its forward
  MACs, counted on the student's output map (stride 8 of the crop);
- convolutions and linear layers only (no BN, activations, pooling, interpolation, losses); the
  discriminator of ``adv`` is left out (it sees 1/8-resolution logits, well under 1 % of a step).
An image is one training crop; a step is ``batch_size`` crops (the global batch: processes x
micro-batches x per-process images), so ``images_seen = steps x batch_size``.

``StepCost`` is the per-image / per-step account; ``RunCost`` what a run spent (``cost.json`` in its
folder); ``run_cost_from_folder`` reconstructs it from the files a finished run wrote (config.json,
metrics.jsonl), which is what ``tools/run_grid.py`` does after each job.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from cwdseg.config import RunConfig, from_dict
from cwdseg.models import output_size
from cwdseg.models.summary import arch_macs, conv_macs_by_module

CONVENTION = ("FLOPs = 2 x MACs (conv + linear); student fwd+bwd = 3 x fwd incl. aux head; teacher fwd only, "
              "no aux head; connectors 3 x fwd on the student's output map; discriminator not counted")
COST_FILE = "cost.json"


@dataclass(frozen=True)
class StepCost:
    """The compute of one training step (see the module docstring for what is counted)."""
    student_arch: str
    teacher_arch: str | None
    crop: tuple[int, int]
    batch_size: int
    student_forward_macs: int      # one image, aux head included
    teacher_forward_macs: int      # one image, aux head excluded; 0 without a teacher
    connector_forward_macs: int    # one image, all connectors

    @property
    def student_flops_per_image(self) -> float:
        return 2.0 * 3 * self.student_forward_macs

    @property
    def teacher_flops_per_image(self) -> float:
        return 2.0 * self.teacher_forward_macs

    @property
    def connector_flops_per_image(self) -> float:
        return 2.0 * 3 * self.connector_forward_macs

    @property
    def flops_per_image(self) -> float:
        return self.student_flops_per_image + self.teacher_flops_per_image + self.connector_flops_per_image

    @property
    def flops_per_step(self) -> float:
        return self.batch_size * self.flops_per_image

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"crop": list(self.crop), "flops_per_image": self.flops_per_image,
                               "flops_per_step": self.flops_per_step, "convention": CONVENTION}


def connector_macs(connectors: Mapping[str, nn.Module] | None, student_arch: str, crop: tuple[int, int]) -> int:
    """Forward MACs of the connectors for one image: each applied to the student's feature map
    (its ``in_channels`` x the student's stride-8 output size)."""
    if not connectors:
        return 0
    hw = output_size(student_arch, crop)
    total = 0
    for module in connectors.values():
        first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
        total += sum(conv_macs_by_module(module, hw, in_channels=first.in_channels).values())
    return total


def step_cost(student_arch: str, teacher_arch: str | None, crop: int | tuple[int, int], batch_size: int,
              connectors: Mapping[str, nn.Module] | None = None, num_classes: int = 19) -> StepCost:
    """The cost of one step of ``batch_size`` crops; ``teacher_arch=None`` for a run without distillation."""
    h, w = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    return StepCost(student_arch, teacher_arch, (h, w), int(batch_size),
                    arch_macs(student_arch, h, w, num_classes=num_classes),
                    arch_macs(teacher_arch, h, w, aux=False, num_classes=num_classes) if teacher_arch else 0,
                    connector_macs(connectors, student_arch, (h, w)))


@dataclass(frozen=True)
class RunCost:
    """What a run spent. FLOPs are the analytic counts of :class:`StepCost` x steps; ``device_seconds``
    is training time (from the step timings) x processes; ``peak_memory_bytes`` the largest logged peak
    (``cwdseg.engine.distributed.peak_memory_mb``: allocated CUDA memory on a GPU, the process's peak
    resident set on a CPU)."""
    steps: int
    images_seen: int
    student_flops: float
    teacher_flops: float
    connector_flops: float
    device_seconds: float | None
    peak_memory_bytes: int | None
    step: StepCost

    @property
    def total_flops(self) -> float:
        return self.student_flops + self.teacher_flops + self.connector_flops

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(total_flops=self.total_flops, step=self.step.to_json(), convention=CONVENTION)
        return out


def run_cost(step: StepCost, steps: int, device_seconds: float | None = None,
             peak_memory_bytes: int | None = None) -> RunCost:
    images = int(steps) * step.batch_size
    return RunCost(int(steps), images, images * step.student_flops_per_image, images * step.teacher_flops_per_image,
                   images * step.connector_flops_per_image, device_seconds, peak_memory_bytes, step)


def logged_training(run_dir: str | Path) -> dict[str, Any] | None:
    """The step timings of ``run_dir/metrics.jsonl``: ``seconds`` (one process: sum over log lines of
    iteration time x the steps of its window; after a resume a step logged twice counts once, the last),
    ``images_per_s`` (mean over lines, the first, which holds start-up, left out when there are others),
    ``peak_mem_mb`` (largest logged). None when there is no such log."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    records: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec and "iter_ms" in rec:
                records[int(rec["step"])] = rec
    if not records:
        return None
    steps = sorted(records)
    seconds, prev = 0.0, -1
    for step in steps:
        seconds += records[step]["iter_ms"] / 1000 * (step - prev)
        prev = step
    rates = [records[s]["images_per_s"] for s in steps]
    rates = rates[1:] if len(rates) > 1 else rates
    peaks = [records[s]["peak_mem_mb"] for s in steps if records[s].get("peak_mem_mb")]
    return {"seconds": seconds, "images_per_s": sum(rates) / len(rates), "peak_mem_mb": max(peaks) if peaks else None}


def step_cost_of_config(cfg: RunConfig) -> StepCost:
    """The step cost of a run configuration (architectures, crop, batch, distillation terms, classes); the
    connectors are built as train.py builds them (``cwdseg.engine.build.build_connectors``)."""
    from cwdseg.engine.build import build_connectors

    m = cfg.models
    teacher = m.teacher_arch if cfg.needs_teacher else None
    connectors = build_connectors(cfg) if cfg.needs_teacher else None
    return step_cost(m.student_arch, teacher, tuple(cfg.data.crop_size), cfg.optim.batch_size, connectors,
                     cfg.data.num_classes or 19)


def run_cost_from_folder(run_dir: str | Path) -> RunCost:
    """The cost of a finished run, from its config.json (architectures, crop, batch, steps, spec) and
    metrics.jsonl (time, memory)."""
    record = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = from_dict(record["config"])
    step = step_cost_of_config(cfg)
    logged = logged_training(run_dir)
    world = int(record.get("environment", {}).get("world_size", 1))
    seconds = None if logged is None else logged["seconds"] * world
    peak = None if logged is None or logged["peak_mem_mb"] is None else int(logged["peak_mem_mb"] * 2 ** 20)
    return run_cost(step, cfg.optim.num_steps, seconds, peak)


def write_cost(run_dir: str | Path, cost: RunCost) -> Path:
    """``run_dir/cost.json``."""
    path = Path(run_dir) / COST_FILE
    path.write_text(json.dumps(cost.to_json(), indent=2) + "\n")
    return path
