"""Losses against independent computations: numpy float64 loops written from the formulas.

The references here never call the terms of ``cwdseg.distill``; they re-derive each loss from its definition
(softmax by exp/sum, explicit sums over n, c, positions).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.distill import (
    CriterionCWD,
    CriterionDSN,
    CriterionKD,
    discriminator_wgan_gp_loss,
    generator_adversarial_loss,
    gradient_penalty,
)

N, C, H, W = 2, 3, 4, 5


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_cwd(s: torch.Tensor, t: torch.Tensor, norm: str, div: str, tau: float,
            ignore: np.ndarray | None = None) -> float:
    """CWD from the formula, float64 loops. ``ignore``: bool [N,H,W] (True = ignored)."""
    s = s.detach().double().numpy()
    t = t.detach().double().numpy()
    n_, c_, h_, w_ = s.shape
    if div == "mse":
        tau = 1.0
    valid = np.ones((n_, h_, w_), bool) if ignore is None else ~ignore

    def dist(ps: np.ndarray, pt: np.ndarray) -> float:
        if div == "kl":
            return float(sum(b * (math.log(b) - math.log(a)) if b > 0 else 0.0 for a, b in zip(ps, pt)))
        return float(((ps - pt) ** 2).sum())

    total = 0.0
    if norm == "channel":
        n_img = 0
        for n in range(n_):
            v = valid[n].ravel()
            if not v.any():
                continue
            n_img += 1
            for c in range(c_):
                ps = _np_softmax(s[n, c].ravel()[v] / tau)
                pt = _np_softmax(t[n, c].ravel()[v] / tau)
                total += dist(ps, pt)
        return total / (n_img * c_) * tau ** 2
    if norm == "spatial":
        count = 0
        for n in range(n_):
            for i in range(h_):
                for j in range(w_):
                    if not valid[n, i, j]:
                        continue
                    count += 1
                    total += dist(_np_softmax(s[n, :, i, j] / tau), _np_softmax(t[n, :, i, j] / tau))
        return total / count * tau ** 2
    if norm == "channel_mean":
        n_img = 0
        for n in range(n_):
            v = valid[n]
            if not v.any():
                continue
            n_img += 1
            ms = np.array([(s[n, c] / tau)[v].mean() for c in range(c_)])
            mt = np.array([(t[n, c] / tau)[v].mean() for c in range(c_)])
            total += dist(ms, mt)
        return total / (n_img * c_) * tau ** 2
    assert norm == "none"  # raw maps, no division by tau; all images (the fix)
    count = 0
    for n in range(n_):
        for i in range(h_):
            for j in range(w_):
                if valid[n, i, j]:
                    count += 1
                    total += dist(s[n, :, i, j], t[n, :, i, j])
    return total / count * tau ** 2


def _maps(positive: bool, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, H, W, generator=g) * scale
    t = torch.randn(N, C, H, W, generator=g) * scale
    if positive:  # the log-of-values modes (channel_mean/none + kl) need positive maps
        s, t = s.abs() + 0.1, t.abs() + 0.1
    return s, t


@pytest.mark.parametrize("norm", ["channel", "spatial", "channel_mean", "none"])
@pytest.mark.parametrize("div", ["kl", "mse"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_loops(norm: str, div: str, tau: float) -> None:
    s, t = _maps(positive=norm in ("channel_mean", "none"))
    got = CriterionCWD(norm, div, tau)(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_cwd(s, t, norm, div, tau), rel=1e-5, abs=1e-7)


def test_cwd_mse_forces_unit_temperature() -> None:
    s, t = _maps(False)
    assert CriterionCWD("channel", "mse", 4.0).temperature == 1.0
    assert CriterionCWD("channel", "mse", 4.0)(s, t).item() == pytest.approx(
        CriterionCWD("channel", "mse", 1.0)(s, t).item(), rel=1e-6)


def test_cwd_none_uses_every_image() -> None:
    # The original used only preds_S[0]; changing image 1 must change the loss here.
    s, t = _maps(False)
    base = CriterionCWD("none", "mse")(s, t).item()
    s2 = s.clone()
    s2[1] += 1.0
    assert CriterionCWD("none", "mse")(s2, t).item() != pytest.approx(base)


def test_cwd_log_of_values_modes_reject_nonpositive() -> None:
    s, t = _maps(False)
    for norm in ("channel_mean", "none"):
        with pytest.raises(ValueError, match="positive"):
            CriterionCWD(norm, "kl")(s, t)


def test_cwd_kl_is_cross_entropy_minus_teacher_entropy() -> None:
    # mmseg-distiller logs the cross-entropy form sum(-p_T log p_S) * tau^2 / (N C).
    s, t = _maps(False, seed=1)
    tau = 4.0
    ps = torch.softmax(s.double().reshape(N, C, -1) / tau, -1)
    pt = torch.softmax(t.double().reshape(N, C, -1) / tau, -1)
    ce = (-(pt * torch.log(ps))).sum() * tau ** 2 / (N * C)
    ent = (-(pt * torch.log(pt))).sum() * tau ** 2 / (N * C)
    got = CriterionCWD("channel", "kl", tau)(s, t).item()
    assert got == pytest.approx((ce - ent).item(), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_peer_formulas(tau: float) -> None:
    s, t = _maps(False, seed=2)
    got = CriterionCWD("channel", "kl", tau)(s, t).item()
    sf, tf = s.double().reshape(N * C, -1), t.double().reshape(N * C, -1)
    # mmrazor ChannelWiseDivergence (loss_weight = 1):
    mmrazor = (torch.softmax(tf / tau, 1) * (torch.log_softmax(tf / tau, 1) - torch.log_softmax(sf / tau, 1))
               ).sum() * tau ** 2 / (C * N)
    # CIRKD / super-gradients channel-wise: KLDivLoss(sum)(log p_S, p_T) / (N C) * tau^2.
    cirkd = F.kl_div(torch.log_softmax(sf / tau, 1), torch.softmax(tf / tau, 1), reduction="sum") / (N * C) * tau ** 2
    assert got == pytest.approx(mmrazor.item(), rel=1e-5)
    assert got == pytest.approx(cirkd.item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["channel", "spatial", "channel_mean", "none"])
@pytest.mark.parametrize("div", ["kl", "mse"])
def test_gradient_reaches_student_never_teacher(norm: str, div: str) -> None:
    s, t = _maps(positive=norm in ("channel_mean", "none"), seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    CriterionCWD(norm, div, 4.0)(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_and_dsn_gradients_skip_teacher() -> None:
    s, t = _maps(False, seed=4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    CriterionKD()(s, t).backward()
    assert s.grad is not None and t.grad is None


# -- ignore mask --------------------------------------------------------------------------------
def _mask(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(N, H, W, generator=g) < 0.4
    m[1] = True  # image 1 entirely ignored
    m[0, 0, 0] = False
    return m


@pytest.mark.parametrize("norm", ["channel", "spatial", "channel_mean", "none"])
@pytest.mark.parametrize("div", ["kl", "mse"])
def test_cwd_ignore_mask_semantics(norm: str, div: str) -> None:
    s, t = _maps(positive=norm in ("channel_mean", "none"), seed=6)
    m = _mask()
    s.requires_grad_(True)
    got = CriterionCWD(norm, div, 2.0)(s, t, ignore_mask=m)
    assert got.item() == pytest.approx(ref_cwd(s, t, norm, div, 2.0, ignore=m.numpy()), rel=1e-5, abs=1e-7)
    got.backward()
    assert torch.isfinite(s.grad).all()
    # Ignored positions get no gradient.
    assert (s.grad.permute(0, 2, 3, 1)[m] == 0).all()


def test_cwd_all_ignored_is_zero() -> None:
    s, t = _maps(False)
    s.requires_grad_(True)
    loss = CriterionCWD()(s, t, ignore_mask=torch.ones(N, H, W, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_cwd_empty_mask_equals_no_mask() -> None:
    s, t = _maps(False)
    for norm in ("channel", "spatial"):
        crit = CriterionCWD(norm, "kl", 4.0)
        assert crit(s, t, torch.zeros(N, H, W, dtype=torch.bool)).item() == pytest.approx(crit(s, t).item(), rel=1e-6)


def test_mask_from_labels_nearest() -> None:
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 19, (2, 17, 23), generator=g)
    labels[torch.rand(2, 17, 23, generator=g) < 0.3] = 255
    h, w = 5, 7
    got = CriterionCWD.mask_from_labels(labels, (h, w))
    assert got.dtype == torch.bool and got.shape == (2, h, w)
    for n in range(2):
        for i in range(h):
            for j in range(w):
                src = labels[n, (i * 17) // h, (j * 23) // w]  # PyTorch 'nearest': floor(i * in / out)
                assert bool(got[n, i, j]) == (int(src) == 255)


def test_cwd_bad_mask_rejected() -> None:
    s, t = _maps(False)
    with pytest.raises(ValueError, match="ignore_mask"):
        CriterionCWD()(s, t, ignore_mask=torch.zeros(N, H + 1, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore_mask"):
        CriterionCWD()(s, t, ignore_mask=torch.zeros(N, H, W))


# -- shapes -------------------------------------------------------------------------------------
def test_cwd_shape_errors_and_resize() -> None:
    s = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"spatial sizes differ.*\(2, 3, 4, 5\).*\(2, 3, 8, 10\)"):
        CriterionCWD()(s, torch.randn(2, 3, 8, 10))
    with pytest.raises(ValueError, match=r"channel counts differ.*\(2, 3, 4, 5\).*\(2, 6, 4, 5\).*connector"):
        CriterionCWD()(s, torch.randn(2, 6, 4, 5))
    with pytest.raises(ValueError, match="channel counts differ"):
        CriterionCWD(resize=True)(s, torch.randn(2, 6, 4, 5))
    with pytest.raises(ValueError, match="norm_type"):
        CriterionCWD("pixel")
    with pytest.raises(ValueError, match="divergence"):
        CriterionCWD("channel", "js")
    # resize=True: the student is resized bilinearly (align_corners=True) to the teacher's size.
    t = torch.randn(2, 3, 8, 10)
    s_up = F.interpolate(s, size=(8, 10), mode="bilinear", align_corners=True)
    assert CriterionCWD(resize=True)(s, t).item() == pytest.approx(ref_cwd(s_up, t, "channel", "kl", 4.0), rel=1e-5)


# -- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["channel", "spatial"])
def test_cwd_bf16_autocast_large_logits(norm: str) -> None:
    g = torch.Generator().manual_seed(8)
    s32 = (torch.randn(2, 19, 33, 33, generator=g) * 100).bfloat16().float()
    t32 = (torch.randn(2, 19, 33, 33, generator=g) * 100).bfloat16().float()
    ref = CriterionCWD(norm, "kl", 4.0)(s32, t32).item()
    s16 = s32.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CriterionCWD(norm, "kl", 4.0)(s16, t32.bfloat16())
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    assert got.item() == pytest.approx(ref, rel=1e-3)
    # And at tau = 1 the softmax over 1089 positions with |z| ~ 300 still gives finite values.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss1 = CriterionCWD(norm, "kl", 1.0)(s16 * 3, t32.bfloat16() * 3)
    loss1.backward()
    assert math.isfinite(loss1.item()) and torch.isfinite(s16.grad.float()).all()


# -- CriterionDSN -------------------------------------------------------------------------------
def _manual_ce(logits: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> float:
    up = F.interpolate(logits.double(), size=size, mode="bilinear", align_corners=True)
    logp = up - up.logsumexp(dim=1, keepdim=True)  # log-softmax by hand
    valid = target != 255
    picked = logp.gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    return float(-(picked[valid]).sum() / valid.sum())


def test_dsn_matches_manual_cross_entropy() -> None:
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 19, 9, 9, generator=g)
    aux = torch.randn(2, 19, 9, 9, generator=g)
    target = torch.randint(0, 19, (2, 65, 65), generator=g)
    target[torch.rand(2, 65, 65, generator=g) < 0.2] = 255
    crit = CriterionDSN()
    total, parts = crit((logits, aux, None), target, return_parts=True)
    main, aux_ce = _manual_ce(logits, target, (65, 65)), _manual_ce(aux, target, (65, 65))
    assert parts["ce_main"].item() == pytest.approx(main, rel=1e-5)
    assert parts["ce_aux"].item() == pytest.approx(aux_ce, rel=1e-5)
    assert total.item() == pytest.approx(main + 0.4 * aux_ce, rel=1e-5)
    # uint8 labels (as the dataset returns them) give the same value; bf16 autocast computes in fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_u8 = crit((logits.bfloat16(), aux.bfloat16()), target.to(torch.uint8))
    assert total_u8.dtype == torch.float32
    ref16 = _manual_ce(logits.bfloat16().float(), target, (65, 65)) + 0.4 * _manual_ce(aux.bfloat16().float(), target, (65, 65))
    assert total_u8.item() == pytest.approx(ref16, rel=1e-5)


def test_dsn_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(1, 19, 3, 3, requires_grad=True)
    loss = CriterionDSN()((logits, logits), torch.full((1, 17, 17), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_dsn_bad_inputs() -> None:
    with pytest.raises(TypeError):
        CriterionDSN()(torch.randn(1, 19, 3, 3), torch.zeros(1, 9, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        CriterionDSN()((torch.randn(1, 19, 3, 3),) * 2, torch.zeros(1, 1, 9, 9, dtype=torch.long))


# -- CriterionKD --------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_matches_explicit_sum(T: float) -> None:
    s, t = _maps(False, seed=10)
    sn, tn = s.double().numpy(), t.double().numpy()
    total = 0.0
    for n in range(N):
        for i in range(H):
            for j in range(W):
                ps, pt = _np_softmax(sn[n, :, i, j] / T), _np_softmax(tn[n, :, i, j] / T)
                total += float((pt * (np.log(pt) - np.log(ps))).sum())
    ref = total / (N * C * H * W) * T ** 2
    assert CriterionKD(T)(s, t).item() == pytest.approx(ref, rel=1e-5)
    # Model output tuples are accepted as in the original (element 0 = logits).
    assert CriterionKD(T)((s, None), (t, None)).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        CriterionKD()(s, t[:, :, :2])


# -- adversarial --------------------------------------------------------------------------------
class LinearCritic(nn.Module):
    """D(x)_n = <w, x_n>: its input gradient is w for every sample and every interpolate."""

    def __init__(self, shape: tuple[int, ...], scale: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = nn.Parameter(torch.randn(shape, generator=g) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_gradient_penalty_linear_critic_closed_form(scale: float) -> None:
    critic = LinearCritic((3, 4, 4), scale)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(critic, real, fake)
    w_norm = float(critic.w.detach().double().norm())
    assert gp.item() == pytest.approx((w_norm - 1) ** 2, rel=1e-5)
    # create_graph=True: the penalty is differentiable w.r.t. D's parameters:
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||.
    gp.backward()
    expected = 2 * (w_norm - 1) * critic.w.detach().double() / w_norm
    torch.testing.assert_close(critic.w.grad.double(), expected, rtol=1e-4, atol=1e-6)


class SquareConvCritic(nn.Module):
    """A critic whose output is a map: D(x) = conv2d(x^2, k), [N, C, 5, 5] -> [N, 1, 3, 3]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(13)
        self.k = nn.Parameter(torch.randn(1, channels, 3, 3, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x * x, self.k)


def test_gradient_penalty_on_a_3x3_output_map() -> None:
    """The penalty differentiates the sum over the critic's output map (the original's
    grad_outputs=ones), not a per-sample mean score."""
    critic = SquareConvCritic(2)
    real = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(14))
    gp = gradient_penalty(critic, real, real.clone())  # real == fake: x_hat = real whatever alpha is
    gp.backward()

    k = critic.k.detach().clone().requires_grad_(True)

    def kernel_sum(c: int, a: int, b: int) -> torch.Tensor:
        """sum over the 3x3 output positions (i, j) of k[c, a - i, b - j] where that tap exists."""
        taps = [k[0, c, a - i, b - j] for i in range(3) for j in range(3) if 0 <= a - i < 3 and 0 <= b - j < 3]
        return torch.stack(taps).sum()

    def penalty(scale: float) -> torch.Tensor:
        terms = []
        for n in range(3):
            # d/dx[c, a, b] of sum_{i,j} sum_{c,p,q} k[c,p,q] x[c, i+p, j+q]^2 = 2 x[c,a,b] * kernel_sum(c, a, b)
            grad = torch.stack([2 * real[n, c, a, b] * kernel_sum(c, a, b) for c in range(2) for a in range(5) for b in range(5)])
            terms.append((torch.sqrt((scale * grad).pow(2).sum()) - 1) ** 2)
        return torch.stack(terms).mean()

    expected = penalty(1.0)
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    torch.testing.assert_close(critic.k.grad, k.grad, rtol=1e-4, atol=1e-6)
    # The gradient of the per-sample mean (what a [N]-score critic would give) is 9x smaller.
    assert abs(penalty(1 / 9).item() - gp.item()) > 1e-2


def test_discriminator_loss_terms_and_weights() -> None:
    critic = LinearCritic((3, 4, 4), 0.3)
    g = torch.Generator().manual_seed(12)
    s = torch.randn(4, 3, 4, 4, generator=g, requires_grad=True)
    t = torch.randn(4, 3, 4, 4, generator=g)
    lam_d, lam_gp = 0.1, 10.0
    loss, parts = discriminator_wgan_gp_loss(critic, s, t, lambda_gp=lam_gp, lambda_d=lam_d)
    w = critic.w.detach().double()
    d_s = (s.detach().double() * w).flatten(1).sum(1).mean()
    d_t = (t.double() * w).flatten(1).sum(1).mean()
    gp = (float(w.norm()) - 1) ** 2
    assert parts["d_wgan"].item() == pytest.approx(lam_d * float(d_s - d_t), rel=1e-5, abs=1e-7)
    assert parts["d_gp"].item() == pytest.approx(lam_d * lam_gp * gp, rel=1e-5)
    assert loss.item() == pytest.approx(parts["d_wgan"].item() + parts["d_gp"].item(), rel=1e-6)
    assert set(parts) == {"d_wgan", "d_gp"} and not parts["d_gp"].requires_grad
    loss.backward()
    assert s.grad is None  # the student gets nothing from the critic's loss
    # Generator side: -mean D(S), gradient to the student through D.
    g_loss = generator_adversarial_loss(critic(s))
    assert g_loss.item() == pytest.approx(-float(d_s), rel=1e-5, abs=1e-7)
    g_loss.backward()
    torch.testing.assert_close(s.grad, -critic.w.detach().expand_as(s) / s.shape[0])


def test_gradient_penalty_runs_fp32_under_autocast() -> None:
    critic = LinearCritic((3, 4, 4), 0.2)
    real, fake = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(critic, real, fake)
    assert gp.dtype == torch.float32
    assert gp.item() == pytest.approx((float(critic.w.detach().double().norm()) - 1) ** 2, rel=1e-5)
