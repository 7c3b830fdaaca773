"""Activated batch normalisation (ABN): batch norm followed by an optional activation.

This is the layer the original code took from InPlace-ABN (``InPlaceABNSync``), rewritten with
standard PyTorch ops so that it runs on CPU and GPU, under autocast, and under DDP.

The InPlace-ABN quirk is part of the released weights: its CUDA kernel scales by
``|weight| + eps`` instead of ``weight``. We *compute that way* (rather than converting weights on
load), so the state_dict holds exactly the values of the original files, a round trip
load -> save is the identity, and training follows the original gradient (sign(w) on the scale).

State-dict keys: ``weight``, ``bias``, ``running_mean``, ``running_var`` — no
``num_batches_tracked``, as in the original files (the released student has exactly 150 keys).

Cross-process statistics (the "Sync" of InPlaceABNSync) are computed with a differentiable
all-reduce of per-channel sums, so they work with NCCL and with gloo on CPU; turn them on with
:func:`convert_sync_abn` after ``init_process_group``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("leaky_relu", "relu", "none")


class ABN(nn.Module):
    """BatchNorm2d with scale ``|weight| + eps``, then an activation.

    Args:
        num_features: channels C of the (N, C, H, W) input.
        activation: ``"leaky_relu"`` (InPlaceABN's default, used in the heads), ``"relu"`` or
            ``"none"`` (the backbone, where a separate ReLU follows).
        slope: negative slope of the leaky ReLU (0.01 in the original).
        eps: added to the variance *and* to ``|weight|``, as in InPlace-ABN.
        momentum: running-statistics momentum; running_var is updated with the unbiased variance.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        slope: float = 0.01,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ABN activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_features = num_features
        self.activation = activation
        self.slope = slope
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Set by convert_sync_abn(); None means per-process statistics.
        self.process_group: dist.ProcessGroup | None = None
        self.sync = False

    def effective_scale(self) -> torch.Tensor:
        """The scale the layer really applies: ``|weight| + eps`` (the InPlace-ABN quirk)."""
        return self.weight.abs() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sync and dist.is_available() and dist.is_initialized():
            x = self._sync_batch_norm(x)
        else:
            x = F.batch_norm(
                x, self.running_mean, self.running_var, self.effective_scale(), self.bias,
                self.training, self.momentum, self.eps,
            )
        return self._activate(x)

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if self.activation == "relu":
            return F.relu(x)
        return x

    def _sync_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics over the batch of every process: all-reduce [count, sum, sum of squares].
        # The differentiable all_reduce makes the backward pass the true gradient of the
        # global-batch normalisation, as InPlaceABNSync's.
        x32 = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=torch.float32)
        stats = torch.cat([count, x32.sum(dim=(0, 2, 3)), (x32 * x32).sum(dim=(0, 2, 3))])
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        stats = _AllReduceSum.apply(stats, group)
        n = stats[0]
        mean = stats[1 : 1 + self.num_features] / n
        var = (stats[1 + self.num_features :] / n - mean * mean).clamp_min(0.0)  # biased
        with torch.no_grad():
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        scale = self.effective_scale().float() * torch.rsqrt(var + self.eps)
        shift = self.bias.float() - mean * scale
        y = x32 * scale[None, :, None, None] + shift[None, :, None, None]
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        act = self.activation if self.activation != "leaky_relu" else f"leaky_relu({self.slope})"
        sync = ", sync" if self.sync else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={act}{sync}"


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: every rank's output depends on every rank's input, so the
    gradient of an input is the sum over ranks of the output gradients (another all-reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def convert_sync_abn(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every ABN in ``module`` use statistics over all processes (SyncBatchNorm semantics).

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does not know the ``|w| + eps`` scale, so it
    would change the outputs of the released weights; use this instead. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, ABN):
            m.sync = True
            m.process_group = process_group
    return module
