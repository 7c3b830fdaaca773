"""The CIRKD-family networks (DeepLabV3-R18/R101/MobileNetV2): key layouts, sizes, published
parameter and FLOP figures, strict loading of files in CIRKD's layouts, and eval-mode outputs of the
ASPP head and of MobileNetV2 blocks against independent computations written here."""
from __future__ import annotations

import pytest
import torch

from cwdseg import checkpoint as ckpt
from cwdseg.models import ARCHS, FEATURE_CHANNELS, NORMALIZATION, arch_spec, build_model, canonical_arch, output_size
from cwdseg.models.deeplabv3 import DeepLabHead
from cwdseg.models.summary import conv_macs_by_module, count_parameters
from tests.factories import (
    cirkd_imagenet_state_dict,
    cirkd_state_dict,
    deeplabv3_key_shapes,
    fill_state_dict,
    pspnet_mobile_key_shapes,
    write_cirkd_deeplabv3,
    write_cirkd_imagenet,
)

NEW = {"deeplabv3_resnet18": "resnet18", "deeplabv3_resnet101": "resnet101", "deeplabv3_mobilenetv2": "mobilenetv2"}

# Published by CIRKD (CVPR 2022, Table 1) and repeated by its successors (MasKD, DIST, Af-DCD):
# parameters (M) and FLOPs (G, 1024x2048 input, counted by CIRKD's utils/flops.py).
PUBLISHED = {"deeplabv3_resnet101": (61.1, 2371.7), "deeplabv3_resnet18": (13.6, 572.0),
             "deeplabv3_mobilenetv2": (3.2, 128.9)}


def meta_model(arch: str):
    with torch.device("meta"):
        return build_model(arch)


# ----------------------------------------------------------------------------------------------
# registry, layout, sizes, published figures


def test_registry_names_aliases_channels_and_normalisation():
    assert canonical_arch("resnet18") == "pspnet_resnet18" and canonical_arch("resnet101") == "pspnet_resnet101"
    assert set(NEW) <= set(ARCHS)
    # head feature = the map before the classifier: its channels are the classifier's input width
    for arch in ARCHS:
        if arch_spec(arch).family == "segformer":  # no classifier named head; RGB ImageNet input (test_segformer.py)
            assert NORMALIZATION[arch] == "imagenet_rgb"
            continue
        model = meta_model(arch)
        classifier = model.head.block[4] if arch.startswith("deeplabv3") else \
            model.head.classifier if arch == "pspnet_mobilenetv2" else model.head
        assert classifier.in_channels == FEATURE_CHANNELS[arch] == arch_spec(arch).feature_channels, arch
        # both families were trained on BGR minus the Caffe mean (CIRKD dataset/cityscapes.py too)
        assert NORMALIZATION[arch] == "caffe_bgr"
    with pytest.raises(ValueError, match="deeplabv3_resnet18"):
        canonical_arch("deeplabv3_resnet50")


@pytest.mark.parametrize("arch,backbone", list(NEW.items()))
def test_state_dict_is_cirkds_layout(arch, backbone):
    spec = dict(deeplabv3_key_shapes(backbone))
    got = {k: tuple(v.shape) for k, v in meta_model(arch).state_dict().items()}
    assert list(got) == list(spec)  # same keys, same order (module order)
    assert got == spec


@pytest.mark.parametrize("arch", list(NEW))
def test_parameter_counts_equal_the_published(arch):
    model = meta_model(arch)
    spec_params = sum(torch.Size(s).numel() for k, s in deeplabv3_key_shapes(NEW[arch])
                      if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert count_parameters(model) == spec_params
    assert round(spec_params / 1e6, 1) == PUBLISHED[arch][0]


@pytest.mark.parametrize("arch", list(NEW))
def test_flops_in_cirkds_convention_equal_the_published(arch):
    macs = conv_macs_by_module(meta_model(arch), (1024, 2048), convention="cirkd")
    assert round(sum(macs.values()) / 1e9, 1) == PUBLISHED[arch][1]


def test_true_macs_of_a_dilated_conv_and_the_cirkd_overcount():
    # ASPP branch b3 (rate 36) of DeepLabV3-R18 on its 128x256 map at 1024x2048: C*Cin*9 per output.
    macs = conv_macs_by_module(meta_model("deeplabv3_resnet18"), (1024, 2048))
    cirkd = conv_macs_by_module(meta_model("deeplabv3_resnet18"), (1024, 2048), convention="cirkd")
    assert macs["head.aspp.b3.block.0"] == 128 * 512 * 9 * 128 * 256
    # CIRKD's formula (H + 2p - k) // s + 1 ignores the dilation: (128 + 72 - 3) + 1 = 198 rows
    assert cirkd["head.aspp.b3.block.0"] == 128 * 512 * 9 * 198 * 326


@pytest.mark.parametrize("arch", list(NEW))
@pytest.mark.parametrize("hw,out", [((512, 512), (64, 64)), ((1024, 2048), (128, 256))])
def test_output_shapes_at_stride_8(arch, hw, out):
    # floor arithmetic of CIRKD's networks: 3x3/s2 conv, then max pool (ResNet) or stride-2 block
    # (MobileNetV2), then one more stride 2: 512 -> 256 -> 128 -> 64.
    with torch.device("meta"):
        model = build_model(arch).eval()
        logits, aux, feat = model(torch.empty(2, 3, *hw))
    assert logits.shape == (2, 19, *out) and feat.shape == (2, FEATURE_CHANNELS[arch], *out)
    if arch == "deeplabv3_mobilenetv2":
        assert aux is None  # CIRKD's MobileNetV2 students have no auxiliary head
    else:
        assert aux.shape == (2, 19, *out)
    assert output_size(arch, hw) == out
    with torch.device("meta"):
        assert model(torch.empty(1, 3, *hw), aux=False)[1] is None


def test_output_size_across_families():
    assert output_size("resnet18", (512, 512)) == (65, 65)  # the original's ceil-mode max pool
    assert output_size("deeplabv3_resnet18", (512, 512)) == (64, 64)
    assert output_size("pspnet_resnet101", (1024, 2048)) == (129, 257)


def test_resnet_v1s_dilation_pattern():
    # GluonCV/CIRKD: first block of the dilation-2 stage enters with 1, of the dilation-4 stage with 2.
    r18 = meta_model("deeplabv3_resnet18").pretrained
    assert r18.maxpool.ceil_mode is False
    expected = {"layer3.0.conv1": 1, "layer3.0.conv2": 2, "layer3.1.conv1": 2, "layer3.1.conv2": 2,
                "layer4.0.conv1": 2, "layer4.0.conv2": 4, "layer4.1.conv1": 4, "layer4.1.conv2": 4,
                "layer2.0.conv1": 1}
    mods = dict(r18.named_modules())
    for name, d in expected.items():
        assert mods[name].dilation == (d, d) and mods[name].padding == (d, d), name
    assert mods["layer2.0.conv1"].stride == (2, 2) and mods["layer3.0.conv1"].stride == (1, 1)
    r101 = dict(meta_model("deeplabv3_resnet101").pretrained.named_modules())
    for name, d in {"layer3.0.conv2": 1, "layer3.5.conv2": 2, "layer4.0.conv2": 2, "layer4.2.conv2": 4}.items():
        assert r101[name].dilation == (d, d), name


def test_mobilenetv2_dilation_pattern():
    # CIRKD's _nostride_dilate for stride 8: features[7:14] dilate 2, features[14:] dilate 4; a block
    # designed with stride 2 gets stride 1 and half the dilation. (stride, dilation) of each dw conv:
    designed = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]   # blocks 1..17
    features = meta_model("deeplabv3_mobilenetv2").pretrained.net.features
    for index, s in enumerate(designed, start=1):
        block = features[index]
        dw = block.conv[0] if index == 1 else block.conv[3]
        assert dw.groups == dw.in_channels
        if index < 7:
            want = (s, 1)
        elif index < 14:
            want = (1, 1) if s == 2 else (1, 2)
        else:
            want = (1, 2) if s == 2 else (1, 4)
        assert (dw.stride[0], dw.dilation[0]) == want and dw.padding[0] == want[1], index


# ----------------------------------------------------------------------------------------------
# loading the files users have


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cirkd") / "deeplabv3_resnet101_citys_best_model.pth"
    return path, write_cirkd_deeplabv3(path, "resnet101", seed=3)


def test_cirkd_teacher_loads_strictly_and_is_inferred(teacher_file):
    path, sd = teacher_file
    assert ckpt.infer_arch(sd) == "deeplabv3_resnet101"
    model = build_model("deeplabv3_resnet101")
    ckpt.load_teacher(model, path)
    state = model.state_dict()
    for key, value in sd.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key


def test_cirkd_teacher_through_evaluate_load_model(teacher_file):
    from cwdseg.evaluation.loop import EvaluationError, checkpoint_normalization, load_model

    path, sd = teacher_file
    model, arch = load_model(path)
    assert arch == "deeplabv3_resnet101" and torch.equal(model.head.block[4].weight, sd["head.block.4.weight"])
    assert checkpoint_normalization(arch).name == "caffe_bgr"
    with pytest.raises(EvaluationError, match="holds a deeplabv3_resnet101 network, not deeplabv3_resnet18"):
        load_model(path, "deeplabv3_resnet18")


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2"])
def test_cirkd_students_load_strictly(tmp_path, backbone):
    arch = f"deeplabv3_{backbone}"
    sd = write_cirkd_deeplabv3(tmp_path / "kd.pth", backbone, seed=4)
    assert ckpt.infer_arch(sd) == arch
    model = build_model(arch)
    ckpt.load_student(model, tmp_path / "kd.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if "num_batches" not in k)


def test_a_cirkdv2_teacher_with_wider_heads_is_refused_listing_every_mismatch(tmp_path):
    sd = cirkd_state_dict("resnet101")
    sd["head.aspp.b0.0.weight"] = torch.zeros(512, 2048, 1, 1)  # CIRKDV2 (2025) widened the head to 512
    sd["head.block.4.weight"] = torch.zeros(19, 512, 1, 1)
    torch.save(sd, tmp_path / "v2.pth")
    model = build_model("deeplabv3_resnet101")
    before = model.head.block[4].weight.clone()
    with pytest.raises(ckpt.CheckpointError, match="2 shape mismatches") as err:
        ckpt.load_teacher(model, tmp_path / "v2.pth")
    assert "head.aspp.b0.0.weight: [512, 2048, 1, 1] vs [256, 2048, 1, 1]" in str(err.value)
    assert torch.equal(model.head.block[4].weight, before)  # nothing loaded


def test_prefixed_and_wrong_family_files_get_hints(tmp_path):
    sd = cirkd_state_dict("resnet18")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    with pytest.raises(ckpt.CheckpointError, match="prefixed 'module.'"):
        ckpt.load_student(build_model("deeplabv3_resnet18"), tmp_path / "ddp.pth")
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"holds a resnet18 DeepLabV3 \(deeplabv3_resnet18\)"):
        ckpt.load_student(build_model("deeplabv3_mobilenetv2"), tmp_path / "r18.pth")
    psp = {k: v for k, v in sd.items() if not k.startswith("head.")}
    psp["head.psp.conv1.0.weight"] = torch.zeros(128, 512, 1, 1)
    with pytest.raises(ckpt.CheckpointError, match="CIRKD PSPNet"):
        ckpt.infer_arch(psp)


@pytest.mark.parametrize("backbone,prefix,skipped", [
    ("resnet18", "pretrained.", ("fc.",)),
    ("mobilenetv2", "pretrained.net.", ("features.18.", "classifier.")),
])
def test_imagenet_initialisations_load_under_their_prefix(tmp_path, backbone, prefix, skipped):
    path = tmp_path / f"{backbone}-imagenet.pth"
    sd = write_cirkd_imagenet(path, backbone, seed=5)
    model = build_model(f"deeplabv3_{backbone}")
    head_before = model.head.block[4].weight.clone()
    report = ckpt.load_imagenet_backbone(model, path, verbose=False)
    state = model.state_dict()
    for key, value in sd.items():
        if key.startswith(skipped) or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(state[prefix + key], value), key
    assert report["skipped"] and all(k.startswith(skipped) or k.endswith("num_batches_tracked") for k in report["skipped"])
    assert torch.equal(model.head.block[4].weight, head_before)
    assert all(not k.startswith(prefix) for k in report["not_loaded"])


def test_resnet101_imagenet_file_loads_into_the_teacher_backbone(tmp_path):
    sd = write_cirkd_imagenet(tmp_path / "resnet101-imagenet.pth", "resnet101", seed=6)
    model = build_model("deeplabv3_resnet101")
    ckpt.load_imagenet_backbone(model, tmp_path / "resnet101-imagenet.pth", verbose=False)
    assert torch.equal(model.pretrained.layer3[22].conv2.weight, sd["layer3.22.conv2.weight"])


def test_wrong_imagenet_file_names_both_backbones(tmp_path):
    torch.save(cirkd_imagenet_state_dict("resnet18"), tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(ckpt.CheckpointError, match="ImageNet resnet18, the model's backbone is a mobilenetv2"):
        ckpt.load_imagenet_backbone(build_model("deeplabv3_mobilenetv2"), tmp_path / "resnet18-imagenet.pth")


# ----------------------------------------------------------------------------------------------
# eval-mode outputs against independent computations (float64, explicit taps)


def ref_conv(x, w, bias=None, stride=1, dilation=1, groups=1):
    """Zero-padded convolution with padding = dilation * (k - 1) / 2, as a sum over kernel taps."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    pad = dilation * (kh - 1) // 2
    xp = torch.zeros(n, c, h + 2 * pad, wd + 2 * pad, dtype=x.dtype)
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1, (wd + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = torch.zeros(n, o, oh, ow, dtype=x.dtype)
    per_group = o // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        wg = w[g * per_group:(g + 1) * per_group]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation: i * dilation + stride * (oh - 1) + 1: stride,
                           j * dilation: j * dilation + stride * (ow - 1) + 1: stride]
                out[:, g * per_group:(g + 1) * per_group] += torch.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def ref_bn(x, sd, prefix, eps=1e-5):
    """Plain BatchNorm2d in eval mode: (x - mean) / sqrt(var + eps) * weight + bias (no |w| here)."""
    def v(name):
        return sd[f"{prefix}.{name}"][None, :, None, None]
    return (x - v("running_mean")) / torch.sqrt(v("running_var") + eps) * v("weight") + v("bias")


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def relu6(x):
    return torch.clamp(x, 0.0, 6.0)


def test_aspp_head_matches_an_independent_computation():
    torch.manual_seed(0)
    cin, c, k = 12, 8, 5
    head = DeepLabHead(cin, k, c).eval()
    sd = {}
    for name, t in head.state_dict().items():  # random values in every tensor, BN statistics included
        if name.endswith("num_batches_tracked"):
            continue
        sd[name] = (0.5 + torch.rand(t.shape)) if name.endswith(("running_var", "weight")) and t.dim() == 1 \
            else torch.randn(t.shape) * (0.3 if t.dim() > 1 else 0.1)
    head.load_state_dict(sd, strict=False)
    x = torch.randn(2, cin, 9, 11)
    with torch.no_grad():
        logits, feature = head(x)
    sd = {k2: v.double() for k2, v in sd.items()}
    xd = x.double()
    branches = [relu(ref_bn(ref_conv(xd, sd["aspp.b0.0.weight"]), sd, "aspp.b0.1"))]
    for b, rate in zip((1, 2, 3), (12, 24, 36)):  # with a 9x11 map, rate >= 12 reaches only the zero padding
        branches.append(relu(ref_bn(ref_conv(xd, sd[f"aspp.b{b}.block.0.weight"], dilation=rate), sd,
                                    f"aspp.b{b}.block.1")))
    pooled = xd.mean(dim=(2, 3), keepdim=True)
    pooled = relu(ref_bn(ref_conv(pooled, sd["aspp.b4.gap.1.weight"]), sd, "aspp.b4.gap.2"))
    branches.append(pooled.expand(-1, -1, 9, 11))
    y = relu(ref_bn(ref_conv(torch.cat(branches, 1), sd["aspp.project.0.weight"]), sd, "aspp.project.1"))
    feat_ref = relu(ref_bn(ref_conv(y, sd["block.0.weight"]), sd, "block.1"))
    logits_ref = ref_conv(feat_ref, sd["block.4.weight"], sd["block.4.bias"])
    assert torch.allclose(feature.double(), feat_ref, atol=1e-4)
    assert torch.allclose(logits.double(), logits_ref, atol=1e-4)


def test_aspp_rates_see_real_pixels_on_a_large_map():
    # On a map larger than the rates, the dilated taps reach real pixels: compare branch b1 alone.
    torch.manual_seed(1)
    head = DeepLabHead(4, 3, 4).eval()
    x = torch.randn(1, 4, 30, 30)
    w = head.aspp.b1.block[0].weight.detach()
    with torch.no_grad():
        got = head.aspp.b1.block[0](x)
    assert torch.allclose(got.double(), ref_conv(x.double(), w.double(), dilation=12), atol=1e-4)


def fill_random(module, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = t
        elif name.endswith(("running_var",)) or (name.endswith("weight") and t.dim() == 1):
            sd[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:
            sd[name] = torch.randn(t.shape, generator=g) * (0.3 if t.dim() > 1 else 0.1)
    module.load_state_dict(sd)
    return {k: v.double() for k, v in sd.items()}


@pytest.mark.parametrize("index,dilation,residual", [(8, 2, True), (14, 2, False), (1, 1, False)])
def test_mobilenetv2_blocks_match_an_independent_computation(index, dilation, residual):
    features = build_model("deeplabv3_mobilenetv2").pretrained.net.features
    block = features[index].eval()
    sd = fill_random(block, seed=index)
    cin = block.conv[0].in_channels
    x = torch.randn(1, cin, 7, 9)
    with torch.no_grad():
        got = block(x).double()
    xd = x.double()
    if index == 1:  # t = 1: dw 3x3 -> BN -> ReLU6 -> pw 1x1 -> BN
        h = relu6(ref_bn(ref_conv(xd, sd["conv.0.weight"], groups=cin), sd, "conv.1"))
        ref = ref_bn(ref_conv(h, sd["conv.3.weight"]), sd, "conv.4")
    else:           # t = 6: pw expand -> BN -> ReLU6 -> dw 3x3 (dilated) -> BN -> ReLU6 -> pw -> BN
        h = relu6(ref_bn(ref_conv(xd, sd["conv.0.weight"]), sd, "conv.1"))
        h = relu6(ref_bn(ref_conv(h, sd["conv.3.weight"], dilation=dilation, groups=h.shape[1]), sd, "conv.4"))
        ref = ref_bn(ref_conv(h, sd["conv.6.weight"]), sd, "conv.7")
    if residual:
        ref = ref + xd
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4)


def test_deeplabv3_outputs_are_head_of_backbone():
    # The three outputs fit together: logits = classifier(head feature), aux = auxlayer(layer3).
    torch.manual_seed(2)
    model = build_model("deeplabv3_resnet18").eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        logits, aux, feat = model(x)
        c3, c4 = model.pretrained(x)
        assert torch.allclose(logits, model.head.block[4](feat), atol=1e-5)
        assert torch.allclose(aux, model.auxlayer(c3), atol=1e-5)
        assert c4.shape[1] == 512 and c3.shape[1] == 256


# ----------------------------------------------------------------------------------------------
# PSPNet-MobileNetV2 (CIRKD's psp_mobile)


def test_pspnet_mobilenetv2_layout_shapes_and_strict_load(tmp_path):
    spec = dict(pspnet_mobile_key_shapes())
    model = build_model("pspnet_mobilenetv2")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec
    assert count_parameters(model) == sum(torch.Size(s).numel() for k, s in spec.items()
                                          if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    with torch.device("meta"):
        logits, aux, feat = build_model("pspnet_mobilenetv2").eval()(torch.empty(1, 3, 1024, 2048))
    assert logits.shape == (1, 19, 128, 256) and aux is None and feat.shape == (1, 128, 128, 256)
    sd = fill_state_dict(list(spec.items()), seed=9, negative_bn=False)
    torch.save(sd, tmp_path / "psp_mobile.pth")
    assert ckpt.infer_arch(sd) == "pspnet_mobilenetv2"
    ckpt.load_student(model, tmp_path / "psp_mobile.pth")
    assert torch.equal(model.head.classifier.weight, sd["head.classifier.weight"])
    write_cirkd_imagenet(tmp_path / "mobilenetv2-imagenet.pth", "mobilenetv2", seed=2)
    report = ckpt.load_imagenet_backbone(model, tmp_path / "mobilenetv2-imagenet.pth", verbose=False)
    assert all(k.startswith("pretrained.net.features.") for k in report["loaded"])


def test_cirkd_psp_head_matches_an_independent_computation():
    from cwdseg.models.pspnet_mobile import PSPHead

    head = PSPHead(8, 3, 4).eval()
    sd = fill_random(head, seed=11)
    x = torch.randn(2, 8, 12, 12)  # divisible by 1, 2, 3, 6: adaptive pooling = plain block means
    with torch.no_grad():
        logits, feature = head(x)
    xd = x.double()
    parts = [xd]
    for i, b in enumerate((1, 2, 3, 6), start=1):
        k = 12 // b
        pooled = xd.reshape(2, 8, b, k, b, k).mean(dim=(3, 5))
        y = relu(ref_bn(ref_conv(pooled, sd[f"psp.conv{i}.0.weight"]), sd, f"psp.conv{i}.1"))
        # bilinear, align_corners=True, from b x b to 12 x 12: source coordinate i * (b - 1) / 11
        coords = torch.arange(12, dtype=torch.float64) * (b - 1) / 11
        lo = coords.floor().long().clamp(max=b - 1)
        hi = (lo + 1).clamp(max=b - 1)
        t = coords - lo
        rows = y[:, :, lo] * (1 - t)[None, None, :, None] + y[:, :, hi] * t[None, None, :, None]
        parts.append(rows[:, :, :, lo] * (1 - t) + rows[:, :, :, hi] * t)
    feat_ref = relu(ref_bn(ref_conv(torch.cat(parts, 1), sd["block.0.weight"]), sd, "block.1"))
    logits_ref = ref_conv(feat_ref, sd["classifier.weight"], sd["classifier.bias"])
    assert torch.allclose(feature.double(), feat_ref, atol=1e-4)
    assert torch.allclose(logits.double(), logits_ref, atol=1e-4)
