"""SegFormer in the registry: published sizes (hand-counted), logits equal to transformers' own forward,
files in the Hugging Face / CIRKD (NVlabs) / mmseg layouts generated here and loaded strictly, the
stride-4 output size, the head/encoder split, and the ONNX export. The layouts are written by this file's
own renaming (from the authors' code: CIRKD models/segformer.py, mmseg mit2mmseg.py) or by transformers'
save_pretrained, never by the code under test."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from cwdseg import checkpoint as ckpt  # noqa: E402
from cwdseg.models import FEATURE_CHANNELS, NORMALIZATION, build_model, is_head_parameter, output_size  # noqa: E402
from cwdseg.models.segformer import SegFormer, segformer_config  # noqa: E402

TINY = dict(num_labels=5, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 2, 4],
            decoder_hidden_size=16, sr_ratios=[8, 4, 2, 1])


def tiny_config(**over):
    return transformers.SegformerConfig(**{**TINY, **over})


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN statistic random (LayerNorm weights 1 and biases 0 would hide swapped keys)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.2
            t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise + (1.0 if t.dim() == 1 and
                                                                                   "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def hf_model(seed: int = 0, config=None):
    return randomise(transformers.SegformerForSemanticSegmentation(config or tiny_config()), seed)


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ sizes


def hand_parameter_count(hidden, depths, decoder, classes, heads=(1, 2, 5, 8), sr=(8, 4, 2, 1), mlp=4):
    """Parameters of SegFormer from its description (Xie et al. 2021, Sec. 3): overlapping patch embeddings
    (7x7/3x3 convs + LN), blocks of LN + efficient attention (q, k, v, out linears; R x R reduction conv + LN
    when R > 1) + LN + Mix-FFN (linear, 3x3 depth-wise conv, linear), a LN per stage; the all-MLP head
    (a linear per stage, 1x1 fuse conv without bias, BN, 1x1 classifier)."""
    total, c_in = 0, 3
    for i, (c, d) in enumerate(zip(hidden, depths)):
        k = 7 if i == 0 else 3
        total += c * c_in * k * k + c + 2 * c                     # patch embedding conv + LN
        block = 2 * c + 4 * (c * c + c) + 2 * c                   # LN, q/k/v/out, LN
        if sr[i] > 1:
            block += c * c * sr[i] * sr[i] + c + 2 * c            # reduction conv + LN
        h = mlp * c
        block += (c * h + h) + (h * 9 + h) + (h * c + c)          # fc1, depth-wise 3x3, fc2
        total += d * block + 2 * c                                # blocks + stage LN
        c_in = c
    total += sum(c * decoder + decoder for c in hidden)           # linear_c1..4
    total += 4 * decoder * decoder + 2 * decoder                  # fuse conv (no bias) + BN affine
    total += decoder * classes + classes                          # classifier
    return total


@pytest.mark.parametrize("variant, classes, published", [("b0", 19, 3.7), ("b0", 150, 3.8), ("b4", 19, 64.0),
                                                         ("b4", 150, 64.1)])
def test_parameter_counts_are_the_published_ones(variant, classes, published):
    hidden, depths, decoder = {"b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
                               "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768)}[variant]
    with torch.device("meta"):
        model = build_model(f"segformer_{variant}", classes)
    count = sum(p.numel() for p in model.parameters())
    assert count == hand_parameter_count(hidden, depths, decoder, classes)
    # published (SegFormer paper, the ADE20K models, 150 classes): B0 3.8M, B4 64.1M; 19 classes: 3.7M, 64.0M
    assert round(count / 1e6, 1) == published
    assert FEATURE_CHANNELS[f"segformer_{variant}"] == decoder


def test_registry_configs_are_the_published_ones():
    expected = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256), "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
                "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768), "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
                "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768), "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768)}
    for variant, (hidden, depths, decoder) in expected.items():
        c = segformer_config(variant)
        assert (c.hidden_sizes, c.depths, c.decoder_hidden_size) == (hidden, depths, decoder)
        assert (c.num_attention_heads, c.sr_ratios, c.patch_sizes, c.strides, c.mlp_ratios) == \
            ([1, 2, 5, 8], [8, 4, 2, 1], [7, 3, 3, 3], [4, 2, 2, 2], [4, 4, 4, 4])
        assert NORMALIZATION[f"segformer_{variant}"] == "imagenet_rgb"


def test_imagenet_rgb_is_the_segformer_normalisation():
    from cwdseg.data.transforms import NORMALIZATIONS

    norm = NORMALIZATIONS["imagenet_rgb"]
    # transformers' SegformerImageProcessor: x / 255, minus IMAGENET_DEFAULT_MEAN, over IMAGENET_DEFAULT_STD, RGB
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    assert norm.rgb
    assert norm.mean == pytest.approx([255 * m for m in IMAGENET_DEFAULT_MEAN], abs=1e-9)
    assert norm.std == pytest.approx([255 * s for s in IMAGENET_DEFAULT_STD], abs=1e-9)


@pytest.mark.parametrize("hw", [(64, 64), (65, 97), (33, 50)])
def test_output_size_is_the_stride4_of_the_forward(hw):
    model = SegFormer(tiny_config()).eval()
    with torch.no_grad():
        logits, aux, feature = model(torch.zeros(1, 3, *hw))
    assert aux is None
    assert tuple(logits.shape[2:]) == tuple(feature.shape[2:]) == output_size("segformer_b0", hw)
    # 7x7 conv, stride 4, padding 3, by hand
    assert output_size("segformer_b3", hw) == tuple((s + 6 - 7) // 4 + 1 for s in hw)
    assert output_size("segformer_b0", (1024, 2048)) == (256, 512)


def test_segformer_and_cnn_maps_differ_for_the_adversarial_check():
    from cwdseg.engine.build import maps_differ

    # engine.build.model_pair_problems refuses --adv exactly when maps_differ (see the train.py test below)
    assert maps_differ("segformer_b4", "pspnet_resnet18", (64, 64))        # 16x16 vs 9x9
    assert maps_differ("deeplabv3_resnet101", "segformer_b0", (512, 512))  # 64x64 vs 128x128
    assert not maps_differ("segformer_b4", "segformer_b0", (65, 97))


# ------------------------------------------------------------------ forward


def test_logits_and_taps_equal_transformers_forward(image):
    hf = hf_model(seed=3)
    ours = SegFormer(tiny_config()).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same keys: transformers' own modules
    fused = {}
    hf.decode_head.activation.register_forward_hook(lambda m, i, o: fused.setdefault("map", o))
    with torch.no_grad():
        want = hf(pixel_values=image, output_hidden_states=True)
        taps = ours.taps(image)
        logits, aux, feature = ours(image)
    assert torch.allclose(logits, want.logits, atol=1e-6, rtol=0)
    assert torch.allclose(feature, fused["map"], atol=1e-6, rtol=0)
    for i, hidden in enumerate(want.hidden_states):
        assert torch.allclose(taps[f"stage{i + 1}"], hidden, atol=1e-6, rtol=0)
    assert feature.shape[1] == TINY["decoder_hidden_size"] and aux is None


def test_cross_entropy_at_quarter_resolution_without_aux():
    from cwdseg.distill import CriterionDSN

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 16, 24, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 64, 96), generator=g)
    labels[:, :3] = 255
    got = CriterionDSN(ignore_index=255)((logits.float(), None, None), labels)
    # by hand: bilinear align_corners=True upsampling to 64x96 in float64, mean CE over labelled pixels
    up = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=True)
    logp = up - up.logsumexp(dim=1, keepdim=True)
    valid = labels != 255
    picked = logp.permute(0, 2, 3, 1)[valid].gather(1, labels[valid][:, None])
    assert got.item() == pytest.approx(-picked.mean().item(), rel=1e-5)


def test_head_parameters_are_the_decode_head():
    model = SegFormer(tiny_config())
    head = [n for n, _ in model.named_parameters() if is_head_parameter("segformer_b0", n)]
    assert head and all(n.startswith("decode_head.") for n in head)
    n_head = sum(p.numel() for n, p in model.named_parameters() if n in head)
    hidden, d = TINY["hidden_sizes"], TINY["decoder_hidden_size"]
    assert n_head == sum(c * d + d for c in hidden) + 4 * d * d + 2 * d + d * 5 + 5
    assert is_head_parameter("segformer_b0", "module._orig_mod.decode_head.classifier.weight")
    assert not is_head_parameter("segformer_b0", "segformer.stages.0.patch_embeddings.proj.weight")
    assert is_head_parameter("pspnet_resnet18", "dsn.0.weight") and not is_head_parameter("pspnet_resnet18", "conv1.weight")
    assert is_head_parameter("deeplabv3_resnet18", "head.aspp.b0.0.weight")
    assert not is_head_parameter("deeplabv3_resnet18", "pretrained.conv1.weight")


# ------------------------------------------------------------------ files


def hub_state_dict(folder) -> "OrderedDict[str, torch.Tensor]":
    from safetensors.torch import load_file
    return OrderedDict(load_file(str(folder / "model.safetensors")))


def cirkd_state_dict(hf, fuse_bias: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """CIRKD models/segformer.py keys, written from the modules of a transformers model (here, not in the
    package): patch_embed{i}.{proj,norm}, block{i}.{j}.{norm1,attn.q,attn.kv,attn.proj,attn.sr,attn.norm,norm2,
    mlp.fc1,mlp.dwconv.dwconv,mlp.fc2}, norm{i}, linear_c{i}.proj, linear_fuse.{0,1}, linear_pred."""
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def put(prefix, module):
        for k, v in module.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                sd[f"{prefix}.{k}"] = v.clone()

    for i, stage in enumerate(hf.segformer.stages, start=1):
        put(f"patch_embed{i}.proj", stage.patch_embeddings.proj)
        put(f"patch_embed{i}.norm", stage.patch_embeddings.layer_norm)
        for j, blk in enumerate(stage.blocks):
            b = f"block{i}.{j}"
            put(f"{b}.norm1", blk.layernorm_before)
            put(f"{b}.attn.q", blk.attention.q_proj)
            sd[f"{b}.attn.kv.weight"] = torch.cat([blk.attention.k_proj.weight, blk.attention.v_proj.weight]).detach().clone()
            sd[f"{b}.attn.kv.bias"] = torch.cat([blk.attention.k_proj.bias, blk.attention.v_proj.bias]).detach().clone()
            put(f"{b}.attn.proj", blk.attention.o_proj)
            if blk.attention.sequence_reduction_ratio > 1:
                put(f"{b}.attn.sr", blk.attention.sequence_reduction.sequence_reduction)
                put(f"{b}.attn.norm", blk.attention.sequence_reduction.layer_norm)
            put(f"{b}.norm2", blk.layernorm_after)
            put(f"{b}.mlp.fc1", blk.mlp.fc1)
            put(f"{b}.mlp.dwconv.dwconv", blk.mlp.dwconv.dwconv)
            put(f"{b}.mlp.fc2", blk.mlp.fc2)
        put(f"norm{i}", stage.layer_norm)
    head = hf.decode_head
    for i, proj in enumerate(head.linear_projections, start=1):
        put(f"linear_c{i}.proj", proj.proj)
    sd["linear_fuse.0.weight"] = head.linear_fuse.weight.detach().clone()
    sd["linear_fuse.0.bias"] = fuse_bias
    put("linear_fuse.1", head.batch_norm)
    sd["linear_fuse.1.num_batches_tracked"] = torch.tensor(7)
    put("linear_pred", head.classifier)
    return sd


def mit2mmseg(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """mmsegmentation's tools/model_converters/mit2mmseg.py renaming (encoder keys of an NVlabs dict)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in sd.items():
        if k.startswith("patch_embed"):
            i = int(k[len("patch_embed")])
            out[k.replace(f"patch_embed{i}", f"layers.{i - 1}.0").replace("proj.", "projection.")] = v
        elif k.startswith("block"):
            i = int(k[len("block")])
            new = k.replace(f"block{i}", f"layers.{i - 1}.1")
            if "attn.q." in new:
                out[new.replace("q.", "attn.in_proj_")] = torch.cat([v, sd[k.replace("q.", "kv.")]], dim=0)
            elif "attn.kv." in new:
                continue
            elif "attn.proj." in new:
                out[new.replace("proj.", "attn.out_proj.")] = v
            elif "mlp." in new:
                new = new.replace("mlp.", "ffn.layers.")
                if "fc1.weight" in new or "fc2.weight" in new:
                    v = v.reshape(*v.shape, 1, 1)
                out[new.replace("fc1.", "0.").replace("dwconv.dwconv.", "1.").replace("fc2.", "4.")] = v
            else:
                out[new] = v
        elif k.startswith("norm"):
            i = int(k[len("norm")])
            out[k.replace(f"norm{i}", f"layers.{i - 1}.2")] = v
    return out


def logits_of(model, image):
    with torch.no_grad():
        out = model(image)
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_folder_loads_strictly_with_the_same_logits(weights, tmp_path, image):
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":
        torch.save(hub_state_dict(tmp_path), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in ckpt.read_hf_folder(tmp_path)
    model = SegFormer(tiny_config())
    ckpt.load_teacher(model, tmp_path)
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(str(tmp_path)).eval()  # a local folder
    assert torch.allclose(logits_of(model.eval(), image), logits_of(reference, image), atol=1e-6, rtol=0)
    assert torch.allclose(logits_of(model, image), logits_of(hf, image), atol=1e-6, rtol=0)


def test_cirkd_layout_file_loads_strictly_with_the_same_logits(tmp_path, image):
    hf = hf_model(seed=7)
    bias = torch.randn(TINY["decoder_hidden_size"], generator=torch.Generator().manual_seed(2))
    path = tmp_path / "segformer_cirkd.pth"
    torch.save(cirkd_state_dict(hf, bias), path)
    model = SegFormer(tiny_config())
    ckpt.load_teacher(model, path)
    # CIRKD's head: BN(conv(x) + bias); the reference is transformers' model with that biased conv
    expected = copy.deepcopy(hf)
    conv = torch.nn.Conv2d(4 * TINY["decoder_hidden_size"], TINY["decoder_hidden_size"], 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(hf.decode_head.linear_fuse.weight)
        conv.bias.copy_(bias)
    expected.decode_head.linear_fuse = conv
    got, want = logits_of(model.eval(), image), logits_of(expected, image)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (logits_of(hf, image) - want).abs().max() > 1e-2  # the bias matters: dropping it would be caught


def test_mmseg_and_nvlabs_encoders_initialise_the_student(tmp_path, image):
    hf = hf_model(seed=9)
    nvlabs = cirkd_state_dict(hf, torch.zeros(TINY["decoder_hidden_size"]))
    encoder = OrderedDict((k, v) for k, v in nvlabs.items() if not k.startswith(("linear_", "norm")) or
                          k.startswith("norm"))
    encoder = OrderedDict((k, v) for k, v in encoder.items() if not k.startswith("linear_"))
    with torch.no_grad():
        want = hf.segformer(image, output_hidden_states=True).hidden_states
    # NVlabs mit_b*.pth: encoder + ImageNet head.*; mmseg: mit2mmseg output, and inside a segmentation checkpoint
    files = {"mit_nvlabs.pth": {**encoder, "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)},
             "mit_mmseg.pth": mit2mmseg(encoder),
             "segformer_mmseg.pth": {"meta": {"mmseg_version": "1.2.2"}, "state_dict": {
                 **{"backbone." + k: v for k, v in mit2mmseg(encoder).items()},
                 "decode_head.convs.0.conv.weight": torch.randn(16, 8, 1, 1),
                 "decode_head.conv_seg.weight": torch.randn(5, 16, 1, 1)}}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        student = SegFormer(tiny_config())
        head_before = {k: v.clone() for k, v in student.decode_head.state_dict().items()}
        report = ckpt.load_imagenet_backbone(student, tmp_path / name, verbose=False)
        assert len(report["loaded"]) == len([k for k in student.state_dict() if k.startswith("segformer.")])
        with torch.no_grad():
            taps = student.eval().taps(image)
        for i, hidden in enumerate(want):
            assert torch.allclose(taps[f"stage{i + 1}"], hidden, atol=1e-5, rtol=0), (name, i)
        assert all(torch.equal(v, head_before[k]) for k, v in student.decode_head.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match="mmsegmentation SegFormer.*different network"):
        ckpt.load_teacher(SegFormer(tiny_config()), tmp_path / "segformer_mmseg.pth")


def test_hugging_face_imagenet_encoder_folder(tmp_path, image):
    cls = randomise(transformers.SegformerForImageClassification(tiny_config(reshape_last_stage=False, num_labels=10)), 4)
    cls.save_pretrained(tmp_path)
    student = SegFormer(tiny_config())
    report = ckpt.load_imagenet_backbone(student, tmp_path, verbose=False)
    assert report["skipped"] == ["classifier.bias", "classifier.weight"] or \
        sorted(report["skipped"]) == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():
        want = cls.segformer(image, output_hidden_states=True).hidden_states
        taps = student.eval().taps(image)
    for i in range(3):
        assert torch.allclose(taps[f"stage{i + 1}"], want[i], atol=1e-6, rtol=0)


def test_mismatches_are_one_clear_error(tmp_path):
    hf_model().save_pretrained(tmp_path / "ok")
    sd = hub_state_dict(tmp_path / "ok")
    del sd["decode_head.linear_c.2.proj.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys: decode_head\.linear_projections\.2\.proj\.weight"):
        ckpt.load_teacher(SegFormer(tiny_config()), tmp_path / "broken.pth")
    with pytest.raises(ckpt.CheckpointError, match="shape mismatches"):
        ckpt.load_teacher(SegFormer(tiny_config(num_labels=7)), tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="without config.json"):
        ckpt.load_teacher(SegFormer(tiny_config()), tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ckpt.CheckpointError, match="model_type is 'bert'"):
        ckpt.load_teacher(SegFormer(tiny_config()), tmp_path / "bert")
    with pytest.raises(ckpt.CheckpointError, match="fits none of the published"):
        ckpt.infer_arch(ckpt.load_state_dict_file(tmp_path / "ok"))


def test_b0_folder_is_recognised_and_loads_as_evaluate_does(tmp_path, image):
    # evaluate's load_model: infer_arch(load_state_dict_file(path)), build_model(arch), load_student
    hf = randomise(transformers.SegformerForSemanticSegmentation(segformer_config("b0", 19)), 11)
    hf.save_pretrained(tmp_path)
    arch = ckpt.infer_arch(ckpt.load_state_dict_file(tmp_path))
    assert arch == "segformer_b0"
    model = build_model(arch, 19)
    ckpt.load_student(model, tmp_path)
    assert torch.allclose(logits_of(model.eval(), image), logits_of(hf, image), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ export


@pytest.mark.slow
def test_onnx_export_matches_pytorch_at_two_sizes(tmp_path):
    from cwdseg.data.transforms import NORMALIZATIONS
    from cwdseg.export.onnx import compare_with_onnxruntime, export_onnx

    model = SegFormer(tiny_config())
    model.load_state_dict(hf_model(seed=13).state_dict())
    norm = NORMALIZATIONS["imagenet_rgb"]
    path = export_onnx(model.eval(), tmp_path / "segformer.onnx", normalization=norm, fold_normalization=True)
    diffs = compare_with_onnxruntime(model, path, sizes=((64, 64), (96, 128)))
    assert set(diffs) == {"64x64", "96x128"} and max(diffs.values()) < 1e-4, diffs


# ------------------------------------------------------------------ training (train.py, 2 steps, 64x64)

TRAIN_FLAGS = ["--input-size", "64,64", "--batch-size", "2", "--num-steps", "2", "--num-workers", "0",
               "--teacher-ckpt", "random", "--student-init", "random", "--log-every", "1", "--device", "cpu",
               "--eval", "False"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=4, n_val=1, n_test=1, size=(96, 192), seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("teacher, student, distill", [
    ("segformer_b0", "segformer_b0", ["cwd=3", "kd=1", "dist=1"]),
    ("pspnet_resnet101", "segformer_b0", ["cwd=3", "kd=1"]),
    ("segformer_b0", "pspnet_resnet18", ["cwd=3", "kd=1"]),
])
def test_train_py_runs_segformer_pairs(teacher, student, distill, synthetic, tmp_path):
    from tests.test_train import ROOT, run

    extra = ["--allow-normalization-mismatch"] if NORMALIZATION[teacher] != NORMALIZATION[student] else []
    proc = run([__import__("sys").executable, "train.py", "--data-dir", str(synthetic), "--save-dir", str(tmp_path),
                "--teacher-arch", teacher, "--student-arch", student, "--distill", *distill, *TRAIN_FLAGS, *extra],
               cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all(f"{name.split('=')[0]}=" in steps[-1] for name in distill), steps
    saved = list(tmp_path.rglob("city_*_G.pth"))
    assert len(saved) == 1
    assert ckpt.infer_arch(ckpt.load_state_dict_file(saved[0])) == student


def test_pair_without_the_mismatch_flag_is_refused_on_normalisation(synthetic, tmp_path):
    from tests.test_train import ROOT, run

    proc = run([__import__("sys").executable, "train.py", "--data-dir", str(synthetic), "--save-dir", str(tmp_path),
                "--teacher-arch", "pspnet_resnet101", "--student-arch", "segformer_b0", "--distill", "kd=1",
                *TRAIN_FLAGS], cwd=ROOT)
    assert proc.returncode == 2
    assert "expects caffe_bgr input but the student segformer_b0 expects imagenet_rgb" in proc.stderr
    proc = run([__import__("sys").executable, "train.py", "--data-dir", str(synthetic), "--save-dir", str(tmp_path),
                "--teacher-arch", "segformer_b4", "--student-arch", "pspnet_resnet18", "--distill", "kd=1", "adv=0.001",
                "--allow-normalization-mismatch", *TRAIN_FLAGS], cwd=ROOT)
    assert proc.returncode == 2
    assert "the teacher segformer_b4 gives 16x16 maps and the student pspnet_resnet18 9x9" in proc.stderr
