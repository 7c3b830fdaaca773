r"""Spectral normalisation of a conv weight, as the original SAGAN critic does it.

The formulation (Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR
2018, Algorithm 1; used by SAGAN, Zhang et al. 2019, in every layer of the critic): with the weight
reshaped to a matrix :math:`W \in \mathbb{R}^{out \times (in \cdot k_h k_w)}` and stored vectors
:math:`u \in \mathbb{R}^{out}`, :math:`v \in \mathbb{R}^{in \cdot k_h k_w}`, each training forward runs one
power iteration and divides the weight by the estimate of its largest singular value:

.. math:: v \leftarrow \frac{W^\top u}{\lVert W^\top u\rVert + \epsilon}, \qquad
          u \leftarrow \frac{W v}{\lVert W v\rVert + \epsilon}, \qquad
          \sigma = u^\top W v, \qquad W_{SN} = W / \sigma

with :math:`\epsilon = 10^{-12}` added to the norm, and u, v treated as constants in the gradient, so
:math:`\partial\sigma/\partial W = u v^\top`.

What the original (``SemSeg-distill/networks/spectral.py`` of TorchDistiller, from SAGAN-pytorch) does
and this module reproduces:

* The order v, then u (PyTorch's ``parametrizations.spectral_norm`` updates u, then v, so from the
  same stored vectors its sigma differs), and the norm as ``x / (||x|| + eps)`` (PyTorch divides by
  ``max(||x||, eps)``).
* Initial u, v drawn from N(0, 1) (u first) and normalised, with no warm-up iterations (PyTorch runs
  15 at construction), so a seeded construction draws the same numbers as the original's.
* The vectors are written into the module at every forward, and the backward of sigma reads the
  vectors stored *when the backward runs*, not those of its own forward. The original gets this from
  autograd: it computes ``sigma = u.dot(W.mv(v))`` with u, v parameters whose ``.data`` every later
  forward replaces, so each saved u, v (a reference to that parameter) has changed by the time the
  backward runs. Within one discriminator step -- forwards of D(S), D(T), D(x_hat), then one backward
  -- every forward keeps its own sigma in the value, but all three use the last forward's u v^T as
  dsigma/dW. (The generator's forward of D(S) is back-propagated before any other forward, so it
  uses its own vectors.) Here that is explicit: :class:`_SigmaFromStoredVectors` reads the module's
  vectors in its backward. Checked against an emulation of the original on identical weights and
  inputs: three full steps (generator term, D step, Adam) agree to 1e-14 in float64.
* ``state_dict`` keys: ``module.bias``, ``module.weight_bar`` (the raw weight, trained),
  ``module.weight_u``, ``module.weight_v``; an original ``*_D.pth`` loads strictly.

Departures:

* u and v are buffers, not parameters with ``requires_grad=False`` as in the original: the keys are
  the same, but they are not in ``parameters()`` (they are never trained; the original's optimiser
  filtered them out by ``requires_grad``).
* In eval mode no power iteration runs: sigma comes from the stored u, v, so that an eval forward
  changes no state (like BatchNorm's running statistics). The original iterated in eval mode too, but
  its training never puts the critic in eval mode, so the recipe is unaffected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / (||x||_2 + eps)``: the original's normalisation (eps added to the norm)."""
    return x / (torch.linalg.vector_norm(x) + eps)


class _SigmaFromStoredVectors(torch.autograd.Function):
    """sigma = u^T W v from ``holder.weight_u`` / ``weight_v``; the backward uses the vectors stored in
    ``holder`` when it runs (see the module docstring), so dsigma/dW = u v^T with the latest u, v.

    The vectors are read from the module instead of being saved for backward on purpose: they are
    overwritten in place by later forwards, which a saved tensor would refuse.
    """

    @staticmethod
    def forward(ctx, weight_mat: Tensor, holder: nn.Module) -> Tensor:  # type: ignore[override]
        ctx.holder = holder
        return torch.dot(holder.weight_u, torch.mv(weight_mat, holder.weight_v))

    @staticmethod
    def backward(ctx, grad_sigma: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # u and v are constants of sigma, so the expression is exact to any order (linear in grad_sigma).
        return grad_sigma * torch.outer(ctx.holder.weight_u, ctx.holder.weight_v), None


class SpectralNorm(nn.Module):
    """Wrap a ``nn.Conv2d`` so that its weight is spectrally normalised at each forward.

    Args:
        module: the conv (``padding_mode="zeros"``). Its ``weight`` parameter is moved to
            ``weight_bar``, and the buffers ``weight_u`` [out] and ``weight_v`` [in * kh * kw] are
            added to it (keys ``module.weight_bar`` / ``module.weight_u`` / ``module.weight_v``).
        power_iterations: iterations per training forward (1, as in the original).
        eps: added to the norms of the power iteration (1e-12, as in the original).

    ``forward(x)``: ``conv2d(x, weight_bar / sigma, bias)``; in train mode first updates u, v.
    """

    def __init__(self, module: nn.Conv2d, power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
            raise TypeError(f"SpectralNorm wraps a nn.Conv2d with padding_mode='zeros'; got {module!r}")
        if power_iterations < 1:
            raise ValueError(f"SpectralNorm: power_iterations must be >= 1; got {power_iterations}")
        self.power_iterations = power_iterations
        self.eps = eps
        weight = module.weight.detach()
        height = weight.shape[0]
        width = weight[0].numel()
        del module._parameters["weight"]
        # Drawn in the original's order (u, then v) from the default generator, then normalised.
        u = l2_normalize(weight.new_empty(height).normal_(0, 1), eps)
        v = l2_normalize(weight.new_empty(width).normal_(0, 1), eps)
        module.register_parameter("weight_bar", nn.Parameter(weight.clone()))
        module.register_buffer("weight_u", u)
        module.register_buffer("weight_v", v)
        self.module = module

    def extra_repr(self) -> str:
        return f"power_iterations={self.power_iterations}, eps={self.eps}"

    @torch.no_grad()
    def _power_iteration(self) -> None:
        """v <- normalize(W^T u), u <- normalize(W v), written into the stored buffers in place."""
        holder = self.module
        w_mat = holder.weight_bar.flatten(1)
        u, v = holder.weight_u, holder.weight_v
        for _ in range(self.power_iterations):
            v = l2_normalize(torch.mv(w_mat.t(), u), self.eps)
            u = l2_normalize(torch.mv(w_mat, v), self.eps)
        holder.weight_v.copy_(v)
        holder.weight_u.copy_(u)

    def normalized_weight(self) -> Tensor:
        """``weight_bar / sigma`` with sigma = u^T W v from the stored vectors (no iteration here)."""
        w = self.module.weight_bar
        sigma = _SigmaFromStoredVectors.apply(w.flatten(1), self.module)
        return w / sigma

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._power_iteration()
        conv = self.module
        return F.conv2d(x, self.normalized_weight(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
