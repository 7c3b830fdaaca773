"""The training step: one optimiser step of the student (and connector), then the discriminator's."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from cwdseg.config import OptimConfig
from cwdseg.distill import discriminator_wgan_gp_loss, generator_adversarial_loss
from cwdseg.distill.taps import TapRecorder
from cwdseg.engine.build import Criteria, Engine, Models, Weights
from cwdseg.engine.distributed import average_buffers, average_gradients
from cwdseg.models.discriminator import MIN_INPUT_SIZE


def poly_lr(base_lr: float, step: int, num_steps: int, power: float) -> float:
    """The original schedule: ``base * (1 - step / num_steps) ** power``, starting at step 0."""
    return base_lr * (1.0 - step / num_steps) ** power


def scheduled_lr(base_lr: float, step: int, optim: OptimConfig) -> float:
    """Poly decay over ``optim.num_steps``, with mmcv's linear warm-up when ``optim.warmup_steps`` > 0:
    ``lr * (1 - (1 - step / warmup) * (1 - warmup_ratio))`` for the first ``warmup`` steps."""
    lr = poly_lr(base_lr, step, optim.num_steps, optim.power)
    if step < optim.warmup_steps:
        lr *= 1.0 - (1.0 - step / optim.warmup_steps) * (1.0 - optim.warmup_ratio)
    return lr


def set_lr(opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None, optim: OptimConfig, step: int) -> float:
    """Both optimisers' learning rates for ``step``; returns the student's (each group's ``lr_mult`` applied)."""
    lr_g = scheduled_lr(optim.lr, step, optim)
    for group in opt_g.param_groups:
        group["lr"] = lr_g * group.get("lr_mult", 1.0)
    if opt_d is not None:
        for group in opt_d.param_groups:
            group["lr"] = poly_lr(optim.lr_d, step, optim.num_steps, optim.power)
    return lr_g


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
    criteria.terms.train()
    opt_g.zero_grad(set_to_none=True)
    terms_sum: dict[str, torch.Tensor] = {}
    logits_pairs = []  # (student, teacher) logits, detached, for the discriminator step
    n_micro = len(micro_batches)
    taps_s_names = criteria.taps("s")
    taps_t_names = list(dict.fromkeys(["logits", *criteria.taps("t")]))  # the discriminator reads the logits

    for i, (images, labels) in enumerate(micro_batches):
        last = i == n_micro - 1
        sync = contextlib.nullcontext() if last or not hasattr(models.student, "no_sync") else models.student.no_sync()
        with sync:
            taps_t = None
            if models.teacher is not None:
                with TapRecorder(models.teacher, taps_t_names, models.teacher_aliases) as rec_t:
                    with torch.inference_mode(), engine.autocast():
                        models.teacher(images, aux=False)  # no loss uses the teacher's aux head
                taps_t = rec_t.cloned()  # inference tensors cannot be saved for backward: copies
            with engine.autocast():
                with TapRecorder(models.student, taps_s_names, models.student_aliases) as rec_s:
                    preds_s = models.student(images)
                terms = {"ce": criteria.dsn(preds_s, labels)}
                for name, term in criteria.terms.items():
                    terms[name] = term(rec_s.taps, taps_t, labels)
                if models.discriminator is not None:
                    # D runs in fp32 (its gradient penalty needs a double backward).
                    with torch.autocast(engine.device.type, enabled=False):
                        d_out = models.discriminator(discriminator_input(preds_s[0]))
                    terms["adv_g"] = weights.adv * generator_adversarial_loss(d_out)
                    logits_pairs.append((preds_s[0].detach(), taps_t["logits"]))
            total = sum(terms.values())
            engine.scaler.scale(total / n_micro).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / n_micro

    world = engine.dist.world_size
    average_gradients(criteria.terms.parameters(), world)  # connectors and the terms' own layers (not in DDP)
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


