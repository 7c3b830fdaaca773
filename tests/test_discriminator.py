"""The SAGAN critic and the CWD feature connector, against hand-written computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cwdseg.models.abn import ABN
from cwdseg.models.connector import FeatureConnector
from cwdseg.models.discriminator import Discriminator, SelfAttention, convert_original_state_dict
from cwdseg.distill import discriminator_wgan_gp_loss, generator_adversarial_loss

SN_LAYERS = ("l1", "l2", "l3", "l4")


@pytest.fixture(scope="module")
def disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator()


def expected_keys() -> set[str]:
    keys = {f"preprocess_additional.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for layer in SN_LAYERS:
        keys |= {f"{layer}.0.bias", f"{layer}.0.parametrizations.weight.original",
                 f"{layer}.0.parametrizations.weight.0._u", f"{layer}.0.parametrizations.weight.0._v"}
    keys |= {"last.0.weight", "last.0.bias"}
    for attn in ("attn1", "attn2"):
        keys |= {f"{attn}.gamma"} | {f"{attn}.{c}_conv.{p}" for c in ("query", "key", "value") for p in ("weight", "bias")}
    return keys


def test_state_dict_keys_and_shapes(disc: Discriminator) -> None:
    sd = disc.state_dict()
    assert set(sd) == expected_keys()
    widths = [19, 64, 128, 256, 512]
    for i, layer in enumerate(SN_LAYERS):
        assert sd[f"{layer}.0.parametrizations.weight.original"].shape == (widths[i + 1], widths[i], 4, 4)
        assert sd[f"{layer}.0.parametrizations.weight.0._u"].shape == (widths[i + 1],)
        assert sd[f"{layer}.0.parametrizations.weight.0._v"].shape == (widths[i] * 16,)
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
    convs = [getattr(d, layer)[0] for layer in SN_LAYERS]
    # Eval mode: no power iteration, the normalised weight is fixed.
    d.eval()
    u0 = [c.parametrizations.weight[0]._u.clone() for c in convs]
    w0 = [c.weight.detach().clone() for c in convs]
    d(torch.randn(1, 19, 65, 65))
    for c, u, w in zip(convs, u0, w0):
        assert torch.equal(c.parametrizations.weight[0]._u, u)
        assert torch.equal(c.weight.detach(), w)
    # Train mode: each evaluation of the weight runs one power iteration (as each forward does).
    d.train()
    d(torch.randn(2, 19, 65, 65))
    assert any(not torch.equal(c.parametrizations.weight[0]._u, u) for c, u in zip(convs, u0))
    for _ in range(300):
        for c in convs:
            c.weight  # noqa: B018 -- one power iteration per access in train mode
    for c in convs:
        w = c.weight.detach()
        sigma_max = torch.linalg.matrix_norm(w.flatten(1).double(), ord=2).item()
        assert sigma_max == pytest.approx(1.0, abs=2e-3)
        # The normalisation is W / sigma with sigma = u^T W v from the stored vectors.
        p = c.parametrizations.weight
        w_orig = p.original.detach().flatten(1)
        sigma = torch.dot(p[0]._u, w_orig @ p[0]._v)
        d.eval()
        torch.testing.assert_close(c.weight.detach().flatten(1), w_orig / sigma)
        d.train()


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


def test_convert_original_state_dict(disc: Discriminator) -> None:
    ours = disc.state_dict()
    original = {}
    for key, value in ours.items():
        for layer in SN_LAYERS:
            pre = f"{layer}.0."
            if key.startswith(pre):
                rest = key[len(pre):]
                key = pre + {"bias": "module.bias", "parametrizations.weight.original": "module.weight_bar",
                             "parametrizations.weight.0._u": "module.weight_u",
                             "parametrizations.weight.0._v": "module.weight_v"}[rest]
        original[key] = value.clone()
    converted = convert_original_state_dict(original)
    assert set(converted) == set(ours)
    fresh = Discriminator()
    fresh.load_state_dict(converted, strict=True)
    for key, value in ours.items():
        assert torch.equal(fresh.state_dict()[key], value)


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
