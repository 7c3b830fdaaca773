"""PSPNet teacher/student: key layout, sizes, and outputs against an independent functional
implementation written here from the formulas of the report (original_code.md §4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cwdseg.models import MODEL_BUILDERS, PSP_FEATURE_CHANNELS, build_model
from cwdseg.models.summary import count_macs, count_parameters, training_step_flops
from tests.factories import pspnet_key_shapes, random_state_dict

# ----------------------------------------------------------------------------------------------
# The appendix of the report, transcribed literally (student convs; every BN has 4 keys of [C]).
APPENDIX_STUDENT_CONVS = {
    "conv1.weight": (64, 3, 3, 3), "conv2.weight": (64, 64, 3, 3), "conv3.weight": (128, 64, 3, 3),
    "layer1.0.conv1.weight": (64, 128, 3, 3), "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.downsample.0.weight": (64, 128, 1, 1),
    "layer1.1.conv1.weight": (64, 64, 3, 3), "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3), "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.1.conv1.weight": (128, 128, 3, 3), "layer2.1.conv2.weight": (128, 128, 3, 3),
    "layer3.0.conv1.weight": (256, 128, 3, 3), "layer3.0.conv2.weight": (256, 256, 3, 3),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "layer3.1.conv1.weight": (256, 256, 3, 3), "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.conv1.weight": (512, 256, 3, 3), "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.1.conv1.weight": (512, 512, 3, 3), "layer4.1.conv2.weight": (512, 512, 3, 3),
    **{f"pspmodule.stages.{i}.1.weight": (128, 512, 1, 1) for i in range(4)},
    "pspmodule.bottleneck.0.weight": (128, 1024, 3, 3),
    "head.weight": (19, 128, 1, 1), "head.bias": (19,),
    "dsn.0.weight": (128, 256, 3, 3), "dsn.0.bias": (128,), "dsn.3.weight": (19, 128, 1, 1), "dsn.3.bias": (19,),
}
APPENDIX_STUDENT_BNS = {
    "bn1": 64, "bn2": 64, "bn3": 128,
    **{f"layer{L}.{b}.bn{j}": c for L, c in zip((1, 2, 3, 4), (64, 128, 256, 512)) for b in (0, 1) for j in (1, 2)},
    **{f"layer{L}.0.downsample.1": c for L, c in zip((1, 2, 3, 4), (64, 128, 256, 512))},
    **{f"pspmodule.stages.{i}.2": 128 for i in range(4)}, "pspmodule.bottleneck.1": 128, "dsn.1": 128,
}
APPENDIX_TEACHER_SHAPES = {
    "layer1.0.conv1.weight": (64, 128, 1, 1), "layer1.0.downsample.0.weight": (256, 128, 1, 1),
    "pspmodule.stages.0.1.weight": (512, 2048, 1, 1), "pspmodule.bottleneck.0.weight": (512, 4096, 3, 3),
    "head.weight": (19, 512, 1, 1), "dsn.0.weight": (512, 1024, 3, 3), "dsn.3.weight": (19, 512, 1, 1),
}


def test_factory_spec_matches_the_report_appendix():
    spec = dict(pspnet_key_shapes("resnet18"))
    literal = dict(APPENDIX_STUDENT_CONVS)
    for bn, c in APPENDIX_STUDENT_BNS.items():
        literal.update({f"{bn}.{s}": (c,) for s in ("weight", "bias", "running_mean", "running_var")})
    assert len(literal) == 150
    assert spec == literal
    teacher = dict(pspnet_key_shapes("resnet101"))
    assert len(teacher) == 565
    for key, shape in APPENDIX_TEACHER_SHAPES.items():
        assert teacher[key] == shape, key
    assert "dsn.0.bias" in teacher and sum(k.startswith("layer3.") and k.endswith("conv3.weight") for k in teacher) == 23


@pytest.mark.parametrize("arch,n_keys", [("resnet18", 150), ("resnet101", 565)])
def test_state_dict_keys_and_shapes_are_the_original_ones(arch, n_keys):
    with torch.device("meta"):
        sd = build_model(arch).state_dict()
    spec = pspnet_key_shapes(arch)
    assert len(sd) == n_keys
    assert list(sd) == [k for k, _ in spec]
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(spec)
    assert not any("num_batches_tracked" in k for k in sd)


@pytest.mark.parametrize("arch,expected,published", [("resnet18", 13_068_262, 13.068), ("resnet101", 70_437_350, 70.437)])
def test_parameter_counts(arch, expected, published):
    with torch.device("meta"):
        model = build_model(arch)
    n = count_parameters(model)
    # independent: every spec entry except the BN running statistics is a parameter
    from_spec = sum(math.prod(s) for k, s in pspnet_key_shapes(arch) if not k.endswith(("running_mean", "running_var")))
    assert n == from_spec == expected
    assert round(n / 1e6, 3) == published


def test_builders_and_errors():
    # the two PSPNets under their aliases and registry names (the other archs: tests/test_models_zoo.py)
    assert {"resnet18", "resnet101", "pspnet_resnet18", "pspnet_resnet101"} <= set(MODEL_BUILDERS)
    assert MODEL_BUILDERS["resnet18"] is MODEL_BUILDERS["pspnet_resnet18"]
    assert PSP_FEATURE_CHANNELS == {"resnet18": 128, "resnet101": 512}
    with pytest.raises(ValueError, match="resnet101"):
        build_model("resnet50")
    assert build_model("resnet18", num_classes=21).head.weight.shape == (21, 128, 1, 1)


def test_student_512_gives_65x65():
    model = build_model("resnet18").eval()
    with torch.no_grad():
        logits, aux, feat = model(torch.randn(1, 3, 512, 512))
    assert logits.shape == (1, 19, 65, 65) and aux.shape == (1, 19, 65, 65) and feat.shape == (1, 128, 65, 65)


@pytest.mark.parametrize("hw,out", [((512, 512), (65, 65)), ((512, 1024), (65, 129)), ((1024, 2048), (129, 257))])
def test_teacher_output_sizes_on_meta(hw, out):
    with torch.device("meta"):
        logits, aux, feat = build_model("resnet101").eval()(torch.empty(2, 3, *hw))
    assert logits.shape == (2, 19, *out) and aux.shape == (2, 19, *out) and feat.shape == (2, 512, *out)


# ----------------------------------------------------------------------------------------------
# Independent implementation of the network, from the formulas, on the state_dict tensors (float64).

EPS = 1e-5


def ref_bn(x, sd, prefix, act):
    mean, var = sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]
    scale = sd[f"{prefix}.weight"].abs() + EPS  # InPlace-ABN: |w| + eps
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS) * scale[None, :, None, None] \
        + sd[f"{prefix}.bias"][None, :, None, None]
    if act == "relu":
        return torch.where(y > 0, y, torch.zeros_like(y))
    if act == "leaky":
        return torch.where(y > 0, y, 0.01 * y)
    return y


def ref_maxpool_3x3_s2_p1_ceil(x):
    n, c, h, w = x.shape

    def out_len(size):
        o = math.ceil((size + 2 - 3) / 2) + 1
        if (o - 1) * 2 >= size + 1:  # the last window must start inside the input or the left padding
            o -= 1
        return o

    oh, ow = out_len(h), out_len(w)
    padded = torch.full((n, c, h + 2 + 3, w + 2 + 3), -math.inf, dtype=x.dtype)
    padded[:, :, 1:1 + h, 1:1 + w] = x
    out = torch.full((n, c, oh, ow), -math.inf, dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            out = torch.maximum(out, padded[:, :, di:di + 2 * oh:2, dj:dj + 2 * ow:2])
    return out


def ref_adaptive_avg_pool(x, size):
    h, w = x.shape[-2:]
    rows = []
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        cols = []
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            cols.append(x[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def ref_bilinear_align_corners(x, out_h, out_w):
    h, w = x.shape[-2:]

    def coords(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.double())

    ylo, yhi, fy = coords(h, out_h)
    xlo, xhi, fx = coords(w, out_w)
    top = x[:, :, ylo][:, :, :, xlo] * (1 - fx) + x[:, :, ylo][:, :, :, xhi] * fx
    bot = x[:, :, yhi][:, :, :, xlo] * (1 - fx) + x[:, :, yhi][:, :, :, xhi] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


def ref_forward(sd, x, arch):
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    conv = lambda t, key, stride=1, dil=1: F.conv2d(  # noqa: E731
        t, sd[key], sd.get(key[:-len("weight")] + "bias"), stride=stride,
        padding=dil * (sd[key].shape[-1] // 2), dilation=dil)
    x = ref_bn(conv(x, "conv1.weight", 2), sd, "bn1", "relu")
    x = ref_bn(conv(x, "conv2.weight"), sd, "bn2", "relu")
    x = ref_bn(conv(x, "conv3.weight"), sd, "bn3", "relu")
    x = ref_maxpool_3x3_s2_p1_ceil(x)
    depths = (2, 2, 2, 2) if arch == "resnet18" else (3, 4, 23, 3)
    for stage, (n, stride, dil) in enumerate(zip(depths, (1, 2, 1, 1), (1, 1, 2, 4)), start=1):
        for b in range(n):
            p, s = f"layer{stage}.{b}", (stride if b == 0 else 1)
            if arch == "resnet18":
                y = ref_bn(conv(x, f"{p}.conv1.weight", s, dil), sd, f"{p}.bn1", "relu")
                y = ref_bn(conv(y, f"{p}.conv2.weight", 1, dil), sd, f"{p}.bn2", "none")
            else:
                y = ref_bn(conv(x, f"{p}.conv1.weight"), sd, f"{p}.bn1", "relu")
                y = ref_bn(conv(y, f"{p}.conv2.weight", s, dil), sd, f"{p}.bn2", "relu")
                y = ref_bn(conv(y, f"{p}.conv3.weight"), sd, f"{p}.bn3", "none")
            res = ref_bn(conv(x, f"{p}.downsample.0.weight", s), sd, f"{p}.downsample.1", "none") if b == 0 else x
            x = torch.clamp(y + res, min=0)
        if stage == 3:
            aux = ref_bn(conv(x, "dsn.0.weight"), sd, "dsn.1", "leaky")
            aux = conv(aux, "dsn.3.weight")
    h, w = x.shape[-2:]
    priors = []
    for i, size in enumerate((1, 2, 3, 6)):
        y = ref_bn(conv(ref_adaptive_avg_pool(x, size), f"pspmodule.stages.{i}.1.weight"), sd, f"pspmodule.stages.{i}.2", "leaky")
        priors.append(ref_bilinear_align_corners(y, h, w))
    feat = ref_bn(conv(torch.cat(priors + [x], dim=1), "pspmodule.bottleneck.0.weight"), sd, "pspmodule.bottleneck.1", "leaky")
    return conv(feat, "head.weight"), aux, feat


def test_reference_helpers_agree_with_torch_ops():
    # sanity of the hand-written pooling/interpolation (the network test relies on them)
    x = torch.randn(2, 3, 11, 14, dtype=torch.float64)
    assert torch.allclose(ref_maxpool_3x3_s2_p1_ceil(x), F.max_pool2d(x, 3, 2, 1, ceil_mode=True))
    for s in (1, 2, 3, 6):
        assert torch.allclose(ref_adaptive_avg_pool(x, s), F.adaptive_avg_pool2d(x, s))
    y = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    assert torch.allclose(ref_bilinear_align_corners(y, 11, 14),
                          F.interpolate(y, size=(11, 14), mode="bilinear", align_corners=True))


@pytest.mark.parametrize("arch,size", [("resnet18", 129), ("resnet101", 65)])
def test_eval_outputs_match_independent_computation(arch, size):
    sd = random_state_dict(arch, seed=3)
    assert any((v < 0).any() for k, v in sd.items() if k.endswith("bn1.weight"))  # the |w| quirk is exercised
    model = build_model(arch).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
    want = ref_forward(sd, x, arch)
    for g, w, name in zip(got, want, ("logits", "aux", "psp_feature")):
        assert g.shape == w.shape, name
        assert w.abs().max() > 0.1, name  # not a trivially small output
        # float32 model vs float64 reference: 1e-4 absolute on the R18's O(1..10) outputs; the R101's
        # random-weight activations grow to O(10..100), so its bound is 1e-4 relative to the largest value.
        tol = 1e-4 if arch == "resnet18" else 1e-4 * max(1.0, w.abs().max().item())
        assert (g.double() - w).abs().max().item() <= tol, name


def test_channels_last_autocast_and_backward():
    torch.manual_seed(0)
    model = build_model("resnet18")
    model.load_state_dict(random_state_dict("resnet18", seed=1))
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)[0]
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))[0]
        assert torch.allclose(ref, cl, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = model(x)[0]
        assert torch.isfinite(lo).all() and lo.shape == ref.shape
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux, feat = model(x.contiguous(memory_format=torch.channels_last))
        loss = logits.float().mean() + 0.4 * aux.float().mean() + feat.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# MACs


def ref_macs(arch, h, w, aux=True):
    """Conv MACs from the spec and the feature-map sizes, computed by hand (dsn included unless aux=False)."""
    spec = {k: v for k, v in pspnet_key_shapes(arch) if aux or not k.startswith("dsn.")}
    half = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)                     # conv1 stride 2, pad 1
    pool = tuple(math.ceil((s - 1) / 2) + 1 for s in half)        # 3x3 s2 p1 ceil mode
    s8 = tuple((s - 1) // 2 + 1 for s in pool)                     # layer2 stride 2
    total = 0
    for key, shape in spec.items():
        if len(shape) != 4:
            continue
        if key.startswith(("conv2", "conv3", "conv1")):
            hw = half
        elif key.startswith("layer1") or (arch == "resnet101" and key == "layer2.0.conv1.weight"):
            hw = pool  # the Bottleneck strides in conv2, so its layer2.0.conv1 still sees the pooled map
        elif key.startswith("pspmodule.stages."):
            b = (1, 2, 3, 6)[int(key.split(".")[2])]
            hw = (b, b)
        else:
            hw = s8
        total += hw[0] * hw[1] * math.prod(shape)
    return total


@pytest.mark.parametrize("arch,published_1024,published_512", [("resnet18", 125.8, 63.3), ("resnet101", 574.9, 289.6)])
def test_macs_match_hand_count_and_published(arch, published_1024, published_512):
    with torch.device("meta"):
        model = build_model(arch)
    m1024 = count_macs(model, (512, 1024))
    m512 = count_macs(model, (512, 512))
    assert m1024 == ref_macs(arch, 512, 1024)
    assert m512 == ref_macs(arch, 512, 512)
    assert abs(m1024 / 1e9 - published_1024) < 0.06
    assert abs(m512 / 1e9 - published_512) < 0.06


def test_training_step_flops():
    s = ref_macs("resnet18", 512, 512)
    t = ref_macs("resnet101", 512, 512, aux=False)  # the teacher runs without its aux head
    assert training_step_flops("resnet18", "resnet101", (512, 512), 8) == 2.0 * 8 * (3 * s + t)
    assert training_step_flops("resnet18", None, 512, 8) == 2.0 * 8 * 3 * s
    assert abs(training_step_flops("resnet18", "resnet101", 512, 8) / 1e12 - 7.36) < 0.01


def test_summary_cli_prints_parameter_count(capsys):
    from cwdseg.models.__main__ import main

    assert main(["--arch", "resnet18", "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "13,068,262 parameters" in out and "13.07M" in out
    assert f"{ref_macs('resnet18', 64, 96) / 1e9:.2f} GMACs" in out


def test_aux_head_can_be_skipped():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        full = model(x)
        lean = model(x, aux=False)
    assert lean[1] is None and full[1] is not None
    assert torch.equal(full[0], lean[0]) and torch.equal(full[2], lean[2])
