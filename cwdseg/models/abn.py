"""Activated batch normalisation (ABN): batch norm followed by an optional activation.

This is the layer the original code took from InPlace-ABN (``InPlaceABNSync``), rewritten with
standard PyTorch ops so that it runs on CPU and GPU, under autocast, and under DDP.

The InPlace-ABN quirk is part of the released weights: its CUDA kernel scales by
``|weight| + eps`` instead of ``weight``. We *compute that way* (rather than converting weights on
load), so the state_dict holds exactly the values of the original files, a round trip
load -> save is the identity, and training follows the original gradient (sign(w) on the scale).

State-dict keys: ``weight``, ``bias``, ``running_mean``, ``running_var`` — no
``num_batches_tracked``, as in the original files (the released student has exactly 150 keys).

Cross-process statistics (the "Sync" of InPlaceABNSync); turn them on with :func:`convert_sync_abn`
after ``init_process_group``. Two implementations, same results (global-batch statistics, the true
gradient of the global-batch normalisation, running_var updated with the unbiased variance):

- ``"native"``: PyTorch's batch-norm statistics kernels, the ones ``torch.nn.SyncBatchNorm`` runs
  (``torch.batch_norm_stats`` / ``_gather_stats_with_counts`` / ``_elemt`` / ``_backward_reduce`` /
  ``_backward_elemt``), in an autograd function shaped like SyncBatchNorm's, fed the scale
  ``|w| + eps``. Activations stay in their dtype (bf16 under autocast) with fp32 statistics; the only
  tensor saved for backward is the input. In torch 2.13 these kernels exist for **CUDA only** (on CPU
  they raise NotImplementedError), so this is the default on CUDA and nowhere else.
- ``"sums"``: a differentiable all-reduce of per-channel [count, sum, sum of squares] in fp32 with
  generic ops; works on any device and backend (gloo on CPU). The default off CUDA.

``"plain"`` runs the native implementation's autograd function with the five kernels written in plain
torch ops: the CPU stand-in that lets the tests and ``benchmarks/bench_abn.py`` check that function here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("leaky_relu", "relu", "none")
SYNC_KERNELS = ("auto", "native", "sums", "plain")


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
        self.sync_kernels = "auto"  # one of SYNC_KERNELS; see the module docstring

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
        kernels = self.sync_kernels
        if kernels == "auto":
            kernels = "native" if x.is_cuda else "sums"
        if kernels == "sums":
            return self._sync_batch_norm_sums(x)
        if kernels == "native" and not x.is_cuda:
            raise RuntimeError("ABN sync_kernels='native' needs CUDA tensors (torch's batch_norm_stats kernels "
                               "are CUDA-only); use 'auto' or 'sums' on this device.")
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return _SyncABNFunction.apply(
            x, self.effective_scale(), self.bias, self.running_mean, self.running_var, self.eps, self.momentum,
            group, _NATIVE_KERNELS if kernels == "native" else _PLAIN_KERNELS,
        )

    def _sync_batch_norm_sums(self, x: torch.Tensor) -> torch.Tensor:
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
        sync = f", sync ({self.sync_kernels})" if self.sync else ""
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


class _Kernels:
    """The five batch-norm statistics kernels SyncBatchNorm's autograd function calls, by name."""

    def __init__(self, stats, gather_stats_with_counts, elemt, backward_reduce, backward_elemt) -> None:
        self.stats, self.gather_stats_with_counts, self.elemt = stats, gather_stats_with_counts, elemt
        self.backward_reduce, self.backward_elemt = backward_reduce, backward_elemt


_NATIVE_KERNELS = _Kernels(torch.batch_norm_stats, torch.batch_norm_gather_stats_with_counts, torch.batch_norm_elemt,
                           torch.batch_norm_backward_reduce, torch.batch_norm_backward_elemt)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t[None, :, None, None]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation type of the native kernels: float64 for float64, else float32."""
    return t if t.dtype == torch.float64 else t.float()


def _plain_stats(x, eps):
    var, mean = torch.var_mean(_acc(x), dim=(0, 2, 3), unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _plain_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
    # Per-rank (count, mean, biased var) -> global mean and biased var (parallel-variance formula).
    counts = counts.to(mean_all.dtype)[:, None]
    var_all = invstd_all.pow(-2) - eps
    n = counts.sum()
    mean = (counts * mean_all).sum(0) / n
    var = (counts * (var_all + (mean_all - mean) ** 2)).sum(0) / n
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(momentum * (var * n / (n - 1)).to(running_var.dtype))
    return mean, torch.rsqrt(var + eps)


def _plain_elemt(x, weight, bias, mean, invstd, eps):
    scale = weight.to(invstd.dtype) * invstd
    return (_acc(x) * _per_channel(scale) + _per_channel(bias.to(mean.dtype) - mean * scale)).to(x.dtype)


def _plain_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    dy_acc = _acc(dy)
    sum_dy = dy_acc.sum(dim=(0, 2, 3))
    sum_dy_xmu = (dy_acc * (_acc(x) - _per_channel(mean))).sum(dim=(0, 2, 3))
    return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd).to(weight.dtype), sum_dy.to(weight.dtype)


def _plain_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    n = count.sum().to(mean.dtype)
    proj = _per_channel(sum_dy_xmu / n * invstd * invstd)
    grad = (_acc(dy) - _per_channel(sum_dy / n) - (_acc(x) - _per_channel(mean)) * proj)
    return (grad * _per_channel(invstd * weight.to(invstd.dtype))).to(dy.dtype)


_PLAIN_KERNELS = _Kernels(_plain_stats, _plain_gather_stats_with_counts, _plain_elemt, _plain_backward_reduce,
                          _plain_backward_elemt)


class _SyncABNFunction(torch.autograd.Function):
    """Global-batch normalisation with a given per-channel ``scale`` (``|w| + eps``), shaped like
    ``torch.nn.modules._functions.SyncBatchNorm``: forward gathers each rank's (mean, invstd, count) and
    combines them; backward all-reduces (sum dy, sum dy (x - mean)). ``scale`` is an autograd input, so
    the weight's gradient flows through ``|w| + eps`` (sign(w) times the scale's gradient).

    Each rank returns its share of the scale and bias gradients (DDP averages them), as SyncBatchNorm."""

    @staticmethod
    def forward(ctx, x, scale, bias, running_mean, running_var, eps, momentum, group, kernels):
        if x.numel() == 0:
            raise ValueError("synchronised ABN got an empty batch")
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else \
            torch.contiguous_format
        x = x.contiguous(memory_format=memory_format)
        scale = scale.contiguous()
        mean, invstd = kernels.stats(x, eps)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=mean.dtype, device=mean.device)
        combined = torch.cat([mean, invstd, count])
        world = dist.get_world_size(group)
        if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(combined) for _ in range(world)]
            dist.all_gather(parts, combined, group=group)
            gathered = torch.stack(parts)
        else:
            gathered = torch.empty(world, combined.numel(), dtype=combined.dtype, device=combined.device)
            dist.all_gather_into_tensor(gathered, combined, group=group)
        channels = x.shape[1]
        mean_all, invstd_all, count_all = torch.split(gathered, [channels, channels, 1], dim=1)
        counts = count_all.reshape(-1).to(running_mean.dtype)
        mean, invstd = kernels.gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum,
                                                        eps, counts)
        ctx.save_for_backward(x, scale, mean, invstd, count_all.reshape(-1).to(torch.int32))
        ctx.group, ctx.kernels = group, kernels
        return kernels.elemt(x, scale, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, mean, invstd, counts = ctx.saved_tensors
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else \
            torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=memory_format)
        need_x, need_scale, need_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_scale, grad_bias = ctx.kernels.backward_reduce(
            grad_out, x, mean, invstd, scale, need_x, need_scale, need_bias)
        grad_x = None
        if need_x:
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, group=ctx.group)
            sum_dy, sum_dy_xmu = torch.split(combined, sum_dy.shape[0])
            grad_x = ctx.kernels.backward_elemt(grad_out, x, mean, invstd, scale.to(mean.dtype), sum_dy, sum_dy_xmu,
                                                counts)
        return (grad_x, grad_scale if need_scale else None, grad_bias if need_bias else None,
                None, None, None, None, None, None)


def convert_sync_abn(module: nn.Module, process_group: dist.ProcessGroup | None = None, *,
                     kernels: str = "auto") -> nn.Module:
    """Make every ABN in ``module`` use statistics over all processes (SyncBatchNorm semantics).

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does not know the ``|w| + eps`` scale, so it
    would change the outputs of the released weights; use this instead. ``kernels``: ``"auto"``
    (PyTorch's native batch-norm statistics kernels on CUDA, the all-reduce of sums elsewhere),
    ``"native"``, ``"sums"`` or ``"plain"`` (see the module docstring). Returns ``module``.
    """
    if kernels not in SYNC_KERNELS:
        raise ValueError(f"kernels must be one of {SYNC_KERNELS}, got {kernels!r}")
    for m in module.modules():
        if isinstance(m, ABN):
            m.sync = True
            m.process_group = process_group
            m.sync_kernels = kernels
    return module
