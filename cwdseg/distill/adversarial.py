"""Holistic distillation ("HO"): the WGAN-GP generator and critic losses of the original (SKD/CWD)."""
from __future__ import annotations


import torch
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region


# --------------------------------------------------------------------------------------------------
# Holistic (adversarial) distillation: WGAN-GP
# --------------------------------------------------------------------------------------------------
def generator_adversarial_loss(d_out_student: Tensor) -> Tensor:
    """Generator (student) side of WGAN: ``-mean D(S)`` (unweighted; the caller multiplies by
    lambda_adv = 0.001).

    ``d_out_student``: the discriminator's scores [N] for the student logits, computed *with*
    gradient to the student (``discriminator(logits_S)``; ``networks.discriminator.Discriminator``
    runs itself in float32). Returns a float32 scalar.
    """
    return -d_out_student.float().mean()


def gradient_penalty(
    discriminator: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    r"""WGAN-GP penalty ``mean_n((||grad_x D(x_hat_n)||_2 - 1)^2)`` (unweighted).

    x_hat = alpha * real + (1 - alpha) * fake with one alpha ~ U(0, 1) per sample; ``real`` and
    ``fake`` are detached (only D gets gradient). The gradient is taken with ``create_graph=True``
    so the penalty can be back-propagated into D. The norm is over all of a sample's elements.
    Runs in float32 with autocast off (a double backward under autocast is fragile).

    ``discriminator`` maps [N, ...] to scores [N] (or any shape whose sum is per-sample additive);
    ``generator`` optionally seeds alpha. Returns a float32 scalar.
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real and fake differ in shape: real {tuple(real.shape)} vs fake {tuple(fake.shape)}")
    with _fp32_region(real.device):
        real = real.detach().float()
        fake = fake.detach().float()
        alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, generator=generator)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = discriminator(x_hat)
        (grad,) = torch.autograd.grad(outputs=out.sum(), inputs=x_hat, create_graph=True)
        norm = torch.linalg.vector_norm(grad.flatten(1), ord=2, dim=1)
        return ((norm - 1) ** 2).mean()


def discriminator_wgan_gp_loss(
    discriminator: nn.Module,
    logits_S: Tensor,
    logits_T: Tensor,
    lambda_gp: float = 10.0,
    lambda_d: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Discriminator (critic) loss of the original's holistic distillation, WGAN-GP.

    .. math:: L_D = \lambda_d\,[\,-\mathrm{mean}\,D(T) + \mathrm{mean}\,D(S)\,]
                    + \lambda_d \lambda_{gp}\,\mathrm{GP}(T, S)

    Both logit maps are detached (the student gets no gradient here). The teacher is "real", the
    student "fake". D is evaluated on S, then T, then the interpolates (the original's order, which
    matters for D's input BatchNorm statistics in train mode). The recipe uses lambda_d = 0.1,
    lambda_gp = 10: pass ``lambda_d`` here (default 1.0 = apply it yourself).

    Returns ``(loss, parts)``: ``loss`` the float32 scalar above, to ``backward()``;
    ``parts = {"d_wgan": lambda_d * (mean D(S) - mean D(T)), "d_gp": lambda_d * lambda_gp * GP}``,
    detached, weighted, summing to ``loss`` (for logging).
    """
    if logits_S.shape != logits_T.shape:
        raise ValueError(f"discriminator_wgan_gp_loss: student {tuple(logits_S.shape)} and teacher "
                         f"{tuple(logits_T.shape)} logits differ in shape")
    with _fp32_region(logits_S.device):
        s = logits_S.detach().float()
        t = logits_T.detach().float()
        d_fake = discriminator(s).float().mean()
        d_real = discriminator(t).float().mean()
        wgan = lambda_d * (d_fake - d_real)
        gp = lambda_d * lambda_gp * gradient_penalty(discriminator, t, s, generator=generator)
        loss = wgan + gp
    return loss, {"d_wgan": wgan.detach(), "d_gp": gp.detach()}
