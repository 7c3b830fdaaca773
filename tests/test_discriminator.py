"""The SAGAN critic and the CWD feature connector, against hand-written computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cwdseg.distill import discriminator_wgan_gp_loss, generator_adversarial_loss, gradient_penalty
from cwdseg.models.abn import ABN
from cwdseg.models.connector import FeatureConnector
from cwdseg.models.discriminator import Discriminator, SelfAttention, convert_original_state_dict
from cwdseg.models.spectral_norm import SpectralNorm

SN_LAYERS = ("l1", "l2", "l3", "l4")


@pytest.fixture(scope="module")
def disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator()


def expected_keys() -> set[str]:
    """The original ``*_D.pth`` layout (report §2: ``l1.0.module.bias``, ``l1.0.module.weight_u``,
    ``l1.0.module.weight_v``, ``l1.0.module.weight_bar``, ``attn1.gamma``, ..., ``preprocess_additional.*``)."""
    keys = {f"preprocess_additional.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for layer in SN_LAYERS:
        keys |= {f"{layer}.0.module.{k}" for k in ("bias", "weight_u", "weight_v", "weight_bar")}
    keys |= {"last.0.weight", "last.0.bias"}
    for attn in ("attn1", "attn2"):
        keys |= {f"{attn}.gamma"} | {f"{attn}.{c}_conv.{p}" for c in ("query", "key", "value") for p in ("weight", "bias")}
    return keys


def test_state_dict_keys_and_shapes(disc: Discriminator) -> None:
    sd = disc.state_dict()
    assert set(sd) == expected_keys()
    widths = [19, 64, 128, 256, 512]
    for i, layer in enumerate(SN_LAYERS):
        assert sd[f"{layer}.0.module.weight_bar"].shape == (widths[i + 1], widths[i], 4, 4)
        assert sd[f"{layer}.0.module.weight_u"].shape == (widths[i + 1],)
        assert sd[f"{layer}.0.module.weight_v"].shape == (widths[i] * 16,)
    assert sd["last.0.weight"].shape == (1, 512, 4, 4)
    assert sd["attn1.query_conv.weight"].shape == (32, 256, 1, 1)
    assert sd["attn2.value_conv.weight"].shape == (512, 512, 1, 1)
    assert sd["attn1.gamma"].item() == 0.0 and sd["attn2.gamma"].item() == 0.0
    # Parameter count from the architecture: BN(19) + 4 SN convs + last conv + 2 attention blocks.
    convs = sum(widths[i + 1] * widths[i] * 16 + widths[i + 1] for i in range(4)) + 512 * 16 + 1
    attn = sum(2 * (c * (c // 8) + c // 8) + c * c + c + 1 for c in (256, 512))
    assert sum(p.numel() for p in disc.parameters()) == 2 * 19 + convs + attn


def test_scores_shape_and_fp32_under_autocast(disc: Discriminator) -> None:
    disc.eval()
    x = torch.randn(3, 19, 65, 65)
    scores = disc(x)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores16 = disc(x.bfloat16())
    assert scores16.dtype == torch.float32
    torch.testing.assert_close(scores16, disc(x.bfloat16().float()))
    # The raw output map: 1x1 at 65x65; 3x3 at 97x97 (a 769 crop), where the score is its mean.
    assert disc.output_map(x).shape == (3, 1, 1, 1)
    x97 = torch.randn(2, 19, 97, 97)
    out_map = disc.output_map(x97)
    assert out_map.shape == (2, 1, 3, 3) and out_map.dtype == torch.float32
    for n in range(2):
        expected = sum(out_map[n, 0, i, j] for i in range(3) for j in range(3)) / 9
        torch.testing.assert_close(disc(x97)[n], expected)


def test_rejects_bad_inputs(disc: Discriminator) -> None:
    with pytest.raises(ValueError, match="at least 64x64"):
        disc(torch.randn(1, 19, 33, 33))
    with pytest.raises(ValueError, match=r"\[N, 19, H, W\]"):
        disc(torch.randn(1, 18, 65, 65))
    with pytest.raises(ValueError, match="too small"):
        Discriminator(image_size=33)


def test_spectral_norm_power_iteration_train_vs_eval() -> None:
    torch.manual_seed(1)
    d = Discriminator()
    sns = [getattr(d, layer)[0] for layer in SN_LAYERS]

    def stored() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(c.module.weight_u.clone(), c.module.weight_v.clone()) for c in sns]

    # Eval mode: no power iteration; the weight is W / (u^T W v) with the stored vectors.
    d.eval()
    before = stored()
    d(torch.randn(1, 19, 65, 65))
    for (u0, v0), (u1, v1) in zip(before, stored()):
        assert torch.equal(u0, u1) and torch.equal(v0, v1)
    for c, (u, v) in zip(sns, before):
        w = c.module.weight_bar.detach()
        w_mat = w.flatten(1).double()
        sigma = torch.dot(u.double(), w_mat @ v.double())  # u^T W v
        torch.testing.assert_close(c.normalized_weight().detach().double(), w.double() / sigma, rtol=1e-5, atol=1e-7)
    # Train mode: each forward runs one power iteration, v <- W^T u / |W^T u|, u <- W v / |W v| (closed form
    # in float64 from the stored vectors) ...
    d.train()
    d(torch.randn(2, 19, 65, 65))
    assert all(not torch.equal(u0, u1) for (u0, _), (u1, _) in zip(before, stored()))
    for c, (u0, _), (u1, v1) in zip(sns, before, stored()):
        w_mat = c.module.weight_bar.detach().flatten(1).double()
        v = w_mat.t() @ u0.double()
        v = v / v.norm()
        u = w_mat @ v
        torch.testing.assert_close(v1.double(), v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u1.double(), u / u.norm(), rtol=1e-5, atol=1e-6)
    # ... whose fixed point is the top singular pair (found here by 300 float64 iterations of that formula
    # on plain matrices): started there, the module keeps it and divides by sigma_max. The two small layers
    # suffice; the one-step formula above covers all four.
    for c in sns[:2]:
        w_mat = c.module.weight_bar.detach().flatten(1).double()
        u = torch.ones(w_mat.shape[0], dtype=torch.float64)
        for _ in range(300):
            v = w_mat.t() @ u
            v = v / v.norm()
            u = w_mat @ v
            sigma_max = u.norm()
            u = u / sigma_max
        with torch.no_grad():
            c.module.weight_u.copy_(u.float())
            c.module.weight_v.copy_(v.float())
        c(torch.zeros(1, c.module.in_channels, 4, 4))
        torch.testing.assert_close(c.module.weight_u.double(), u, rtol=0, atol=1e-3)
        normalized = c.normalized_weight().detach().flatten(1).double()
        torch.testing.assert_close(normalized, w_mat / sigma_max, rtol=1e-3, atol=1e-6)


def test_self_attention_matches_loops() -> None:
    torch.manual_seed(2)
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 3, 4)
    assert torch.equal(attn(x), x)  # gamma = 0 at initialisation: identity
    with torch.no_grad():
        attn.gamma.fill_(0.7)
    got = attn(x).detach()

    def conv1x1(conv: torch.nn.Conv2d, v: torch.Tensor) -> torch.Tensor:  # v: [C] at one position
        return conv.weight.detach()[:, :, 0, 0] @ v + conv.bias.detach()

    for n in range(2):
        pos = [(i, j) for i in range(3) for j in range(4)]
        feats = [x[n, :, i, j] for i, j in pos]
        q = [conv1x1(attn.query_conv, f) for f in feats]
        k = [conv1x1(attn.key_conv, f) for f in feats]
        v = [conv1x1(attn.value_conv, f) for f in feats]
        for a, (i, j) in enumerate(pos):
            energy = torch.stack([torch.dot(q[a], k[b]) for b in range(len(pos))])
            weights = torch.exp(energy - energy.max())
            weights = weights / weights.sum()
            out = sum(weights[b] * v[b] for b in range(len(pos)))
            torch.testing.assert_close(got[n, :, i, j], 0.7 * out + x[n, :, i, j], rtol=1e-4, atol=1e-5)


def test_d_step_with_gradient_penalty(disc: Discriminator) -> None:
    disc.train()
    s = torch.randn(2, 19, 65, 65, requires_grad=True)
    t = torch.randn(2, 19, 65, 65) * 2
    disc.zero_grad()
    loss, parts = discriminator_wgan_gp_loss(disc, s, t, lambda_gp=10.0, lambda_d=0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is None
    grads = [p.grad for p in disc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The penalty reaches the attention gammas only through the double backward.
    assert disc.attn1.gamma.grad.abs().item() > 0
    g_loss = generator_adversarial_loss(disc(s))
    g_loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def _original_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random state_dict in the original ``*_D.pth`` layout, shapes from the architecture (report §2)."""
    g = torch.Generator().manual_seed(seed)
    widths = [19, 64, 128, 256, 512]
    sd: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(SN_LAYERS):
        cin, cout = widths[i], widths[i + 1]
        sd[f"{layer}.0.module.bias"] = torch.randn(cout, generator=g)
        sd[f"{layer}.0.module.weight_u"] = F.normalize(torch.randn(cout, generator=g), dim=0)
        sd[f"{layer}.0.module.weight_v"] = F.normalize(torch.randn(cin * 16, generator=g), dim=0)
        sd[f"{layer}.0.module.weight_bar"] = torch.randn(cout, cin, 4, 4, generator=g) * 0.05
    sd["last.0.weight"], sd["last.0.bias"] = torch.randn(1, 512, 4, 4, generator=g), torch.randn(1, generator=g)
    for attn, c in (("attn1", 256), ("attn2", 512)):
        sd[f"{attn}.gamma"] = torch.randn(1, generator=g)
        for conv, cout in (("query", c // 8), ("key", c // 8), ("value", c)):
            sd[f"{attn}.{conv}_conv.weight"] = torch.randn(cout, c, 1, 1, generator=g)
            sd[f"{attn}.{conv}_conv.bias"] = torch.randn(cout, generator=g)
    sd["preprocess_additional.weight"], sd["preprocess_additional.bias"] = torch.rand(19, generator=g), torch.randn(19, generator=g)
    sd["preprocess_additional.running_mean"] = torch.randn(19, generator=g)
    sd["preprocess_additional.running_var"] = torch.rand(19, generator=g) + 0.5
    sd["preprocess_additional.num_batches_tracked"] = torch.tensor(40000)
    return sd


def test_original_d_file_loads_strictly(tmp_path) -> None:
    from cwdseg.checkpoint import load_state_dict_file

    original = _original_state_dict(seed=4)
    assert set(original) == expected_keys()
    path = tmp_path / "city_39999_D.pth"
    torch.save(original, path, _use_new_zipfile_serialization=False)  # the released files' serialization
    d = Discriminator()
    d.load_state_dict(load_state_dict_file(path), strict=True)
    for key, value in d.state_dict().items():
        assert torch.equal(value, original[key]), key
    # The layouts are the same: conversion is the identity on an original file.
    converted = convert_original_state_dict(original)
    assert converted.keys() == original.keys() and all(converted[k] is original[k] for k in original)


def test_convert_parametrization_layout() -> None:
    """Files written before this project had its own spectral norm used PyTorch's parametrization keys."""
    original = _original_state_dict(seed=5)
    legacy_names = {"module.bias": "bias", "module.weight_bar": "parametrizations.weight.original",
                    "module.weight_u": "parametrizations.weight.0._u", "module.weight_v": "parametrizations.weight.0._v"}
    legacy = {}
    for key, value in original.items():
        layer, _, rest = key.partition(".0.")
        legacy[f"{layer}.0.{legacy_names[rest]}" if layer in SN_LAYERS else key] = value
    assert "l1.0.bias" in legacy and "last.0.bias" in legacy
    converted = convert_original_state_dict(legacy)
    assert set(converted) == set(original)
    for key, value in original.items():
        assert converted[key] is value, key
    Discriminator().load_state_dict(converted, strict=True)
    with pytest.raises(KeyError, match="l2.0.parametrizations.weight.0._w"):
        convert_original_state_dict({**legacy, "l2.0.parametrizations.weight.0._w": torch.zeros(1)})


def test_connector_keys_and_forward() -> None:
    torch.manual_seed(3)
    conn = FeatureConnector(8, 16)
    assert list(conn.state_dict()) == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert conn[0].weight.shape == (16, 8, 1, 1) and conn[0].bias is None
    assert isinstance(conn[1], ABN) and conn[1].activation == "leaky_relu" and conn[1].slope == 0.01
    with torch.no_grad():
        conn[1].weight.uniform_(-1.5, 1.5)
        conn[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 5, 5)
    # Manual: 1x1 conv as a matmul, batch statistics, scale |w| + eps, leaky ReLU, ReLU.
    y = torch.einsum("oc,nchw->nohw", conn[0].weight.detach()[:, :, 0, 0], x)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    scale = (conn[1].weight.detach().abs() + 1e-5)[None, :, None, None]
    z = (y - mean) / torch.sqrt(var + 1e-5) * scale + conn[1].bias.detach()[None, :, None, None]
    expected = F.relu(F.leaky_relu(z, 0.01))
    conn.train()
    torch.testing.assert_close(conn(x), expected, rtol=1e-4, atol=1e-5)
    default = FeatureConnector()
    assert default[0].weight.shape == (512, 128, 1, 1)


# -- spectral norm, against the power iteration written out ------------------------------------
def _normalize_by_hand(x: list[float]) -> list[float]:
    norm = sum(xi * xi for xi in x) ** 0.5
    return [xi / (norm + 1e-12) for xi in x]


def _power_iteration_by_hand(w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """v <- normalize(W^T u), u <- normalize(W v), sigma = u^T W v, with explicit sums (float64)."""
    rows = w.double().flatten(1).tolist()
    h, width = len(rows), len(rows[0])
    u_list = u.double().tolist()
    v_new = _normalize_by_hand([sum(rows[i][j] * u_list[i] for i in range(h)) for j in range(width)])
    u_new = _normalize_by_hand([sum(rows[i][j] * v_new[j] for j in range(width)) for i in range(h)])
    sigma = sum(u_new[i] * sum(rows[i][j] * v_new[j] for j in range(width)) for i in range(h))
    return torch.tensor(u_new, dtype=torch.float64), torch.tensor(v_new, dtype=torch.float64), sigma


def _small_sn(seed: int) -> SpectralNorm:
    torch.manual_seed(seed)
    sn = SpectralNorm(torch.nn.Conv2d(3, 4, 3, stride=1, padding=1).double())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # given u, v (not unit vectors: the iteration normalises)
        sn.module.weight_u.copy_(torch.randn(4, generator=g, dtype=torch.float64))
        sn.module.weight_v.copy_(torch.randn(27, generator=g, dtype=torch.float64))
    return sn


def _sn_weight_grad(g_sn: torch.Tensor, w: torch.Tensor, sigma: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """d/dW of <G, W / sigma(W)> with d sigma / dW = u v^T: G / sigma - <G, W> / sigma^2 * u v^T."""
    return g_sn / sigma - (g_sn * w).sum() / sigma**2 * torch.outer(u, v).view_as(w)


def test_spectral_norm_initial_vectors_are_the_originals_draws() -> None:
    """u then v from N(0, 1) on the default generator right after the conv's init, normalised, no
    warm-up iterations (PyTorch's parametrization runs 15): a seeded build draws what the original's does."""
    torch.manual_seed(15)
    conv = torch.nn.Conv2d(3, 4, 3)
    u = torch.empty(4).normal_(0, 1)
    v = torch.empty(27).normal_(0, 1)
    torch.manual_seed(15)
    sn = SpectralNorm(torch.nn.Conv2d(3, 4, 3))
    assert torch.equal(sn.module.weight_bar.detach(), conv.weight.detach())
    torch.testing.assert_close(sn.module.weight_u, torch.tensor(_normalize_by_hand(u.tolist())))
    torch.testing.assert_close(sn.module.weight_v, torch.tensor(_normalize_by_hand(v.tolist())))
    assert [name for name, _ in sn.named_parameters()] == ["module.bias", "module.weight_bar"]
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SpectralNorm(torch.nn.Linear(3, 4))


def test_spectral_norm_forward_backward_by_hand() -> None:
    sn = _small_sn(seed=7)
    assert set(sn.state_dict()) == {"module.bias", "module.weight_bar", "module.weight_u", "module.weight_v"}
    w = sn.module.weight_bar.detach().clone()
    u_new, v_new, sigma = _power_iteration_by_hand(w, sn.module.weight_u.clone())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    r = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    sn.train()
    y = sn(x)
    # The new vectors are written into the module.
    torch.testing.assert_close(sn.module.weight_u, u_new)
    torch.testing.assert_close(sn.module.weight_v, v_new)
    w_sn = (w / sigma).requires_grad_(True)
    expected = F.conv2d(x, w_sn, sn.module.bias.detach(), padding=1)
    torch.testing.assert_close(y, expected)
    (y * r).sum().backward()
    (g_sn,) = torch.autograd.grad((expected * r).sum(), w_sn)  # dL / d(W / sigma), by the conv's autograd
    torch.testing.assert_close(sn.module.weight_bar.grad, _sn_weight_grad(g_sn, w, sigma, u_new, v_new))
    torch.testing.assert_close(sn.module.bias.grad, r.sum(dim=(0, 2, 3)))


def test_spectral_norm_backward_uses_the_last_forwards_vectors() -> None:
    """Two forwards, then one backward: each keeps its own sigma, both use the second u v^T."""
    sn = _small_sn(seed=8)
    sn.train()
    w = sn.module.weight_bar.detach().clone()
    u1, v1, sigma1 = _power_iteration_by_hand(w, sn.module.weight_u.clone())
    u2, v2, sigma2 = _power_iteration_by_hand(w, u1)
    x1, x2 = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(1, 3, 4, 6, dtype=torch.float64)
    r1, r2 = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(1, 4, 4, 6, dtype=torch.float64)
    y1 = sn(x1)
    y2 = sn(x2)
    ((y1 * r1).sum() + (y2 * r2).sum()).backward()
    grads = []
    for x, r, sigma in ((x1, r1, sigma1), (x2, r2, sigma2)):
        w_sn = (w / sigma).requires_grad_(True)
        grads.append(torch.autograd.grad((F.conv2d(x, w_sn, sn.module.bias.detach(), padding=1) * r).sum(), w_sn)[0])
    shared = _sn_weight_grad(grads[0], w, sigma1, u2, v2) + _sn_weight_grad(grads[1], w, sigma2, u2, v2)
    own = _sn_weight_grad(grads[0], w, sigma1, u1, v1) + _sn_weight_grad(grads[1], w, sigma2, u2, v2)
    torch.testing.assert_close(sn.module.weight_bar.grad, shared)
    assert not torch.allclose(shared, own, rtol=1e-3)  # the two readings differ: the test can tell them apart


# -- the gradient penalty on the real critic's 3x3 map -------------------------------------------
def test_gradient_penalty_differentiates_the_3x3_output_map() -> None:
    torch.manual_seed(9)
    d = Discriminator()
    for layer in SN_LAYERS:  # 30 power iterations: sigma near the top singular value, as in training
        sn = getattr(d, layer)[0]
        for _ in range(30):
            sn(torch.zeros(1, sn.module.in_channels, 4, 4))
    d.eval()  # eval: no power iteration, so every forward below sees the same weights
    with torch.no_grad():
        d.attn1.gamma.fill_(0.3)
        d.attn2.gamma.fill_(-0.2)
    real = torch.randn(2, 19, 97, 97)
    # real == fake makes x_hat = real whatever alpha is.
    gp = gradient_penalty(d, real, real.clone())
    x = real.clone().requires_grad_(True)
    out_map = d.output_map(x)
    assert out_map.shape == (2, 1, 3, 3)
    total = sum(out_map[n, 0, i, j] for n in range(2) for i in range(3) for j in range(3))
    (grad,) = torch.autograd.grad(total, x)
    expected = sum((grad[n].pow(2).sum().sqrt() - 1) ** 2 for n in range(2)) / 2
    assert gp.item() == pytest.approx(expected.item(), rel=1e-4)
    # The gradient of the per-sample mean score is 9x smaller here, and gives another penalty.
    (grad_mean,) = torch.autograd.grad(d(x).sum(), x)
    torch.testing.assert_close(grad_mean * 9, grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
    assert abs(sum((grad_mean[n].pow(2).sum().sqrt() - 1) ** 2 for n in range(2)).item() / 2 - gp.item()) > 1e-3


# -- one full discriminator step with the shared vectors, sequenced by hand ---------------------
def test_d_step_gradients_match_a_hand_sequenced_step() -> None:
    """D(S), D(T), D(x_hat) forwards (one power iteration each), then one backward of
    lambda_d * (mean D(S) - mean D(T)) + lambda_d * lambda_gp * GP. In the hand computation each
    forward's sigma keeps its own value, and every d sigma / dW is u3 v3^T (the third forward's)."""
    torch.manual_seed(10)
    d = Discriminator(in_channels=4, conv_dim=8).train()  # 97x97 inputs: a 3x3 output map
    with torch.no_grad():
        d.attn1.gamma.fill_(0.5)
        d.attn2.gamma.fill_(-0.4)
    sns = [getattr(d, layer)[0] for layer in SN_LAYERS]
    u0 = [c.module.weight_u.clone() for c in sns]
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 4, 97, 97, generator=g), 2 * torch.randn(2, 4, 97, 97, generator=g)
    lam_d, lam_gp = 0.1, 10.0

    loss, parts = discriminator_wgan_gp_loss(d, s, t, lambda_gp=lam_gp, lambda_d=lam_d, generator=torch.Generator().manual_seed(12))
    params = [p for _, p in d.named_parameters()]
    d.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in params]

    # Hand: three power iterations per layer from the stored u (v <- W^T u, u <- W v), sigma of each.
    per_layer = []
    for c, u in zip(sns, u0):
        w = c.module.weight_bar.detach()
        steps = []
        for _ in range(3):
            u_next, v_next, sigma = _power_iteration_by_hand(w, u)
            steps.append((u_next.float(), v_next.float(), sigma))
            u = u_next.float()
        per_layer.append(steps)
    for c, steps in zip(sns, per_layer):  # the module holds the third forward's vectors
        torch.testing.assert_close(c.module.weight_u, steps[2][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.module.weight_v, steps[2][1], rtol=1e-4, atol=1e-6)

    def sn_weight(layer: int, forward: int, shared: bool) -> torch.Tensor:
        w = sns[layer].module.weight_bar
        u, v, sigma = per_layer[layer][2 if shared else forward][:2] + (per_layer[layer][forward][2],)
        grad_path = torch.dot(u, w.flatten(1) @ v)  # carries d sigma / dW = u v^T
        return w / (sigma + grad_path - grad_path.detach())

    def hand_map(x: torch.Tensor, forward: int, shared: bool) -> torch.Tensor:
        bn = d.preprocess_additional
        out = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        for k in range(3):
            out = F.leaky_relu(F.conv2d(out, sn_weight(k, forward, shared), sns[k].module.bias, 2, 1), 0.1)
        out = d.attn1(out)
        out = F.leaky_relu(F.conv2d(out, sn_weight(3, forward, shared), sns[3].module.bias, 2, 1), 0.1)
        out = d.attn2(out)
        return F.conv2d(out, d.last[0].weight, d.last[0].bias)

    def hand_loss(shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        wgan = lam_d * (hand_map(s, 0, shared).mean() - hand_map(t, 1, shared).mean())
        alpha = torch.rand((2, 1, 1, 1), generator=torch.Generator().manual_seed(12))
        x_hat = (alpha * t + (1 - alpha) * s).requires_grad_(True)
        out = hand_map(x_hat, 2, shared)
        (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)  # the sum over the 3x3 map
        gp = sum((grad[n].pow(2).sum().sqrt() - 1) ** 2 for n in range(2)) / 2
        return wgan + lam_d * lam_gp * gp, wgan

    expected_loss, expected_wgan = hand_loss(shared=True)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
    assert parts["d_wgan"].item() == pytest.approx(expected_wgan.item(), rel=1e-4, abs=1e-7)
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    for (name, _), a, b in zip(d.named_parameters(), got, expected):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 * max(1.0, b.abs().max().item()), msg=name)
    # Each forward's own vectors would give other gradients in the SN layers.
    got_by_name = dict(zip((name for name, _ in d.named_parameters()), got))
    own = torch.autograd.grad(hand_loss(shared=False)[0], [c.module.weight_bar for c in sns])
    rel = [((o - got_by_name[f"{layer}.0.module.weight_bar"]).norm() / o.norm()).item() for o, layer in zip(own, SN_LAYERS)]
    assert max(rel) > 1e-2, rel
