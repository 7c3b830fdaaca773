"""Model size and compute: parameters, multiply-accumulates (MACs) and the FLOPs of a training step.

Convention (checked against the published 13.07M / 125.8G and 70.44M / 574.9G of SKD/IFVD/CWD):
MACs are the multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` in one forward pass of
one image, *including the auxiliary dsn head*, with bias additions, BN, activations, pooling and
interpolation not counted. A conv contributes ``output elements x in_channels/groups x kh x kw``.
Measured with this code: PSPNet-R18 125.83 G at 512x1024 (63.34 G at 512x512; 123.34 G without the
dsn head, which does not match), PSPNet-R101 574.93 G (289.65 G at 512x512; 535.29 G without dsn).

The CIRKD family publishes "FLOPs" counted by its ``utils/flops.py``: the same conv
multiply-accumulates (aux head included), but with each conv's output size computed as
``(H + 2 * padding - kernel) // stride + 1``, *ignoring the dilation*, which over-counts every dilated
conv (an ASPP branch of rate 36 on a 128x256 map is counted as 198x326). ``convention="cirkd"``
reproduces that count: 2371.7 G (DeepLabV3-R101), 572.0 G (DeepLabV3-R18) and 128.9 G
(DeepLabV3-MobileNetV2) at 1024x2048, the figures CIRKD and its successors print; the true MACs of
these networks are 2063.3 G, 517.5 G and 106.5 G.

SegFormer's efficient self-attention also multiplies activations by activations: ``Q K^T`` and
``A V`` cost ``N x N_kv x C`` each (N tokens, N_kv = N / R^2 after the sequence reduction), counted
under ``<attention>.matmul``. With them, SegFormer-B0 with a 150-class head counts 8.39 G at 512x512
and 125.35 G at 1024x2048 (19 classes: 120.96 G), against the SegFormer paper's "GFLOPs" 8.4 (ADE20K,
512x512) and 125.5 (Cityscapes, 1024x2048), which are multiply-accumulates too; convolutions and
linears alone would be 54.4 G at 1024x2048.

The count runs the forward on the ``meta`` device (shapes only, no arithmetic), so it costs about
a second even for the R101 at full resolution.
"""
from __future__ import annotations

import functools
from itertools import chain

import torch
from torch import nn
from torch.func import functional_call


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    # DDP keeps the network in .module, torch.compile in ._orig_mod (possibly both).
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def count_parameters(model: nn.Module) -> int:
    """Number of elements of all parameters (trainable or not; buffers are not counted)."""
    return sum(p.numel() for p in model.parameters())


MAC_CONVENTIONS = ("true", "cirkd")
AUX_HEAD_PREFIXES = ("dsn.", "auxlayer.")  # auxiliary heads: PSPNet's dsn, DeepLabV3's auxlayer


def conv_macs_by_module(model: nn.Module, input_size: tuple[int, int], convention: str = "true",
                        in_channels: int = 3) -> dict[str, int]:
    """MACs of each ``nn.Conv2d`` / ``nn.Linear`` (by qualified name) for one forward of one
    ``in_channels``-channel input (an image: 3; a connector: the student's feature channels) of
    ``input_size`` = (H, W). The model is run in eval mode on meta tensors, its
    weights and mode are left untouched. ``convention="cirkd"`` counts each conv at the output
    size CIRKD's ``utils/flops.py`` computes, which ignores dilation (see the module docstring)."""
    if convention not in MAC_CONVENTIONS:
        raise ValueError(f"convention must be one of {MAC_CONVENTIONS}, got {convention!r}")
    model = unwrap_model(model)
    h, w = int(input_size[0]), int(input_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"input_size must be positive (H, W), got {input_size}")
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_output = (module.in_channels // module.groups) * kh * kw
                n_out = output.numel()
                if convention == "cirkd":
                    x = inputs[0]
                    oh = (x.shape[2] + 2 * module.padding[0] - kh) // module.stride[0] + 1
                    ow = (x.shape[3] + 2 * module.padding[1] - kw) // module.stride[1] + 1
                    n_out = output.shape[0] * module.out_channels * oh * ow
            else:  # nn.Linear
                per_output = module.in_features
                n_out = output.numel()
            macs[name] = macs.get(name, 0) + n_out * per_output
        return record

    def attention_hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            hidden, height, width = inputs[0], int(inputs[1]), int(inputs[2])
            ratio = module.sequence_reduction_ratio
            n_kv = (height // ratio) * (width // ratio) if ratio > 1 else height * width
            batch, tokens, channels = hidden.shape
            macs[name + ".matmul"] = macs.get(name + ".matmul", 0) + 2 * batch * tokens * n_kv * channels
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles += [m.register_forward_hook(attention_hook(n)) for n, m in model.named_modules() if _is_mit_attention(m)]
    modes = {m: m.training for m in model.modules()}
    meta_state = {k: torch.empty_like(v, device="meta")
                  for k, v in chain(model.named_parameters(), model.named_buffers())}
    try:
        model.eval()
        with torch.no_grad():
            functional_call(model, meta_state, (torch.empty(1, in_channels, h, w, device="meta"),))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return macs


def _is_mit_attention(module: nn.Module) -> bool:
    """transformers' SegformerAttention (recognised by its parts, so that this module needs no transformers)."""
    return hasattr(module, "sequence_reduction_ratio") and hasattr(module, "q_proj") and hasattr(module, "k_proj")


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Conv + linear multiply-accumulates of one forward pass of one image of size (H, W)
    (the convention of the published GMACs: dsn head included, biases not counted)."""
    return sum(conv_macs_by_module(model, input_size).values())


def _as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


@functools.lru_cache(maxsize=None)
def arch_macs(arch: str, height: int, width: int, aux: bool = True, num_classes: int = 19) -> int:
    """MACs of one image through ``build_model(arch)``, cached per (arch, size); the model is
    built on the meta device, so no memory or initialisation time is spent. ``aux=False`` leaves
    out the auxiliary head (dsn / auxlayer), as ``model(x, aux=False)`` does; ``num_classes`` sizes the
    classifiers."""
    from cwdseg.models import build_model

    with torch.device("meta"):
        model = build_model(arch, num_classes=num_classes)
    macs = conv_macs_by_module(model, (height, width))
    return sum(v for name, v in macs.items() if aux or not name.startswith(AUX_HEAD_PREFIXES))


def training_step_flops(student_arch: str, teacher_arch: str | None,
                        crop: int | tuple[int, int], batch: int) -> float:
    """Analytic FLOPs of one distillation step on ``batch`` crops of size ``crop``.

    FLOPs = 2 x MACs. The student runs forward + backward, counted as 3 x its forward (backward
    = gradients for inputs and for weights, each about one forward); the frozen teacher runs forward
    only, without its auxiliary head (train.py calls it with ``aux=False``). The connector and the
    discriminator are left out (under 1 % of the total). With R18/R101, batch 8 and 512x512:
    2 x 8 x (3 x 63.34 + 269.67) G = 7.36 TFLOP.
    """
    h, w = _as_hw(crop)
    student = 3 * arch_macs(student_arch, h, w)
    teacher = arch_macs(teacher_arch, h, w, aux=False) if teacher_arch is not None else 0
    return 2.0 * batch * float(student + teacher)
