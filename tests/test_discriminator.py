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
    stored = lambda: [(c.module.weight_u.clone(), c.module.weight_v.clone()) for c in sns]  # noqa: E731
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
    # Train mode: each forward runs one power iteration, which converges to the top singular pair.
    d.train()
    d(torch.randn(2, 19, 65, 65))
    assert all(not torch.equal(u0, u1) for (u0, _), (u1, _) in zip(before, stored()))
    for c in sns:
        probe = torch.zeros(1, c.module.in_channels, 4, 4)
        for _ in range(300):
            c(probe)
        sigma_max = torch.linalg.matrix_norm(c.normalized_weight().detach().flatten(1).double(), ord=2).item()
        assert sigma_max == pytest.approx(1.0, abs=2e-3)


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
