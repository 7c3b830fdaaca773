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
    gradient to the student (``discriminator(logits_S)``; ``cwdseg.models.discriminator.Discriminator``
    runs itself in float32). Returns a float32 scalar.
    """
    return -d_out_student.float().mean()


def critic_output_map(discriminator: nn.Module, x: Tensor) -> Tensor:
    """The critic's output map for ``x``: ``discriminator.output_map(x)`` for a critic that has one
    (``cwdseg.models.discriminator.Discriminator``: [N, 1, h, w]), else ``discriminator(x)`` (a critic
    whose forward is its map, e.g. [N] scores)."""
    output_map = getattr(discriminator, "output_map", None)
    return output_map(x) if callable(output_map) else discriminator(x)


def gradient_penalty(
    discriminator: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    r"""WGAN-GP penalty ``mean_n((||grad_x sum_p D(x_hat)_{n,p}||_2 - 1)^2)`` (unweighted), as the
    original's ``CriterionAdditionalGP``.

    x_hat = alpha * real + (1 - alpha) * fake with one alpha ~ U(0, 1) per sample; ``real`` and
    ``fake`` are detached (only D gets gradient). D's output *map* (:func:`critic_output_map`) is
    differentiated with ``grad_outputs`` = ones, i.e. the gradient of the sum over its positions p
    (the original's ``autograd.grad(out[0], x_hat, grad_outputs=ones)``). This is not the gradient of
    the per-sample mean score: the two differ by the number of positions, h * w, once the map is
    larger than 1x1 (inputs from 80x80, crops from 631 px; 3x3 at a 769 crop). The gradient is taken
    with ``create_graph=True`` so the penalty can be back-propagated into D. The norm is over all of
    a sample's elements. Runs in float32 with autocast off (a double backward under autocast is
    fragile).

    ``generator`` optionally seeds alpha. Returns a float32 scalar.
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real and fake differ in shape: real {tuple(real.shape)} "
                         f"vs fake {tuple(fake.shape)}")
    with _fp32_region(real.device):
        real = real.detach().float()
        fake = fake.detach().float()
        alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, generator=generator)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = critic_output_map(discriminator, x_hat)
        (grad,) = torch.autograd.grad(outputs=out, inputs=x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
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
    matters in train mode for D's input BatchNorm statistics and for its spectral norm: each forward
    runs one power iteration, and the backward of the returned loss uses the u, v of the last one,
    the interpolates', for all three; see ``cwdseg.models.spectral_norm``). The recipe uses lambda_d = 0.1,
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
        # The per-sample scores (the mean of each map) averaged over the batch are the original's mean
        # over the whole map, since every sample's map has the same size.
        d_fake = discriminator(s).float().mean()
        d_real = discriminator(t).float().mean()
        wgan = lambda_d * (d_fake - d_real)
        gp = lambda_d * lambda_gp * gradient_penalty(discriminator, t, s, generator=generator)
        loss = wgan + gp
    return loss, {"d_wgan": wgan.detach(), "d_gp": gp.detach()}
