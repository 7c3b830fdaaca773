"""Cross-image relational KD (CIRKD, Yang et al., CVPR 2022): the mini-batch pixel-to-pixel relation
and the memory-bank pixel-to-pixel / pixel-to-region contrast. Its pixel KD is
:class:`cwdseg.distill.lskd.CriterionLSKD` with ``standardize=False``, T = 1.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _labels_at, _match_size
from cwdseg.distill._pixel import wide
from cwdseg.distill.options import Option, resolve_options


def _relation_row(i: int, s: Tensor, t: Tensor, tau: float) -> Tensor:
    """Sum over j of KL(batchmean over P rows) between the P x P similarity maps of image i with image j."""
    ss = torch.matmul(s[i], s.transpose(1, 2)) / tau   # [P, C] @ [B, C, P] -> [B, P, P]
    ts = torch.matmul(t[i], t.transpose(1, 2)) / tau
    ls, lt = F.log_softmax(ss, dim=2), F.log_softmax(ts, dim=2)
    return (lt.exp() * (lt - ls)).sum() / s.shape[1]


class _RecomputedRow(torch.autograd.Function):
    """:func:`_relation_row` that keeps only its inputs for backward and recomputes the similarity maps
    there (activation checkpointing without ``torch.utils.checkpoint``, whose first call imports dynamo)."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, i: int, tau: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(s, t)
        ctx.i, ctx.tau = i, tau
        with torch.no_grad():
            return _relation_row(i, s, t, tau)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        s, t = ctx.saved_tensors
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            (grad_s,) = torch.autograd.grad(_relation_row(ctx.i, leaf, t, ctx.tau), leaf, grad)
        return grad_s, None, None, None


class CriterionCIRKDMiniBatch(nn.Module):
    r"""CIRKD's mini-batch pixel-to-pixel relation (``losses/cirkd_mini_batch.py``
    ``CriterionMiniBatchCrossImagePair``).

    Features L2-normalised over channels, flattened to P = H*W rows: :math:`\hat s_i \in R^{P\times C_s}`,
    :math:`\hat t_i \in R^{P\times C_t}`. For every ordered pair (i, j), i = j included:

    .. math:: L = \frac{1}{B^2} \sum_{i,j} \frac{1}{P} \sum_{p} \mathrm{KL}\Big(
              \mathrm{softmax}_q(\hat t_i \hat t_j^\top / \tau)_{p} \,\Big\|\,
              \mathrm{softmax}_q(\hat s_i \hat s_j^\top / \tau)_{p}\Big)

    tau = 0.1, no tau**2 (as the reference). The widths may differ (each side compares with itself);
    the student map is resized to the teacher's size. The relation is per process: CIRKD's 8 GPUs x 2
    images saw B = 2. Each row i is recomputed in backward (:class:`_RecomputedRow`) when gradients are on, so memory
    holds B P^2 similarities at a time instead of B^2 P^2 (8 x 65^2 maps: 0.6 GB instead of 4.5 GB),
    at the cost of recomputing the forward in backward. Teacher detached; float32 (float64 stays).

    ``forward(s [N,Cs,h,w], t [N,Ct,H,W], labels=None) -> scalar``.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "tau": Option(0.1, low=0, low_open=True, help="temperature of the similarity softmax"),
    }

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = resolve_options("CriterionCIRKDMiniBatch", self.OPTIONS, {"tau": tau})["tau"]

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        with _fp32_region(s.device):
            t = wide(t.detach())
            s = _match_size(wide(s), t, True, "CriterionCIRKDMiniBatch")
            b = s.shape[0]
            s = F.normalize(s, p=2, dim=1).flatten(2).transpose(1, 2)   # [B, P, Cs]
            t = F.normalize(t, p=2, dim=1).flatten(2).transpose(1, 2)
            total = s.new_zeros(())
            for i in range(b):
                if torch.is_grad_enabled() and s.requires_grad:
                    total = total + _RecomputedRow.apply(s, t, i, self.tau)
                else:
                    total = total + _relation_row(i, s, t, self.tau)
            return total / (b * b)


class CriterionCIRKDMemory(nn.Module):
    r"""CIRKD's memory-based pixel-to-pixel and pixel-to-region contrast (``losses/cirkd_memory.py``
    ``StudentSegContrast``, training script ``train_cirkd.py``).

    The student feature goes through the projection head h (1x1 conv no bias, BN, ReLU, 1x1 conv no
    bias; Cs -> Ct); both features are L2-normalised per pixel; labels are nearest-resized to the
    feature size. The memory holds, per class k, ``pixel_memory`` teacher pixel embeddings and
    ``region_memory`` teacher region embeddings (dim Ct), registered buffers with their pointers.

    Step (in this order, as the reference): (1) enqueue the batch's teacher features (below);
    (2) draw one index set of ``pixel_contrast // K + 1`` pixel slots and one of
    ``region_contrast // K + 1`` region slots, shared by all classes, and gather the contrast sets
    X (class-major rows); (3) for the valid (non-ignored) pixels, with :math:`\tau_c` = ``tau`` and
    :math:`\tau_k` = ``kd_tau``:

    .. math:: L_X = \frac{\tau_k^2}{|\Omega|} \sum_{p \in \Omega} \mathrm{KL}\big(
              \mathrm{softmax}(t_p X^\top / \tau_c / \tau_k) \,\|\,
              \mathrm{softmax}(h(s)_p X^\top / \tau_c / \tau_k)\big),
              \qquad L = w_p L_{pixel} + w_r L_{region}

    Enqueue, per image and per class k present (ascending, ignore label excluded): region slot at
    ``region_ptr[k]`` <- L2(mean of the class's normalised teacher vectors), pointer + 1 mod size
    (a ring). Pixel slots: K = min(#class pixels, ``pixel_update``) vectors; if ``ptr + K >= size``
    the *last* K slots are written and the pointer resets to 0, else slots ptr..ptr+K-1 and ptr += K
    (not a ring). Which K vectors: ``perm = randperm(#class pixels)``; the reference takes the image's
    flat positions ``perm[:K]`` (any class: a bug), reproduced with ``enqueue="authors"`` (default, for
    parity); ``enqueue="class"`` takes the class's own positions ``idx[perm[:K]]``.

    Random draws come from ``self.rng`` (a CPU ``torch.Generator``; the global generator when None),
    in this order: one ``randperm(#class pixels)`` per (image, present class), then
    ``randperm(pixel_memory)``, then ``randperm(region_memory)`` (these two only when some pixel is
    valid). A batch with no valid pixel gives 0
    (attached to the graph; the enqueue still happens). The buffers are initialised with normalised
    Gaussian vectors, as the reference. Single-process: the reference gathers keys over processes
    before enqueueing (not done here). Weights (Cityscapes): ``pixel`` = ``region`` = 0.1 (VOC 0.01).

    ``forward(s [N,Cs,h,w], t [N,Ct,H,W], labels [N,H0,W0]) -> scalar``; ``parts`` gives the two terms.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "pixel": Option(0.1, low=0, help="weight of the memory pixel-to-pixel term (lambda_memory_pixel)"),
        "region": Option(0.1, low=0, help="weight of the memory pixel-to-region term (lambda_memory_region)"),
        "tau": Option(0.1, low=0, low_open=True, help="contrast temperature (similarity / tau)"),
        "kd_tau": Option(1.0, low=0, low_open=True, help="temperature of the KL between similarity rows"),
        "pixel_memory": Option(20000, low=1, help="pixel slots per class"),
        "region_memory": Option(2000, low=1, help="region slots per class"),
        "pixel_contrast": Option(4096, low=1, help="pixel contrast size (per class: // K + 1)"),
        "region_contrast": Option(1024, low=1, help="region contrast size (per class: // K + 1)"),
        "pixel_update": Option(16, low=1, help="pixel vectors enqueued per image and class"),
        "enqueue": Option("authors", choices=("authors", "class"), help="which pixels are enqueued"),
    }

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int, ignore_label: int = 255,
                 rng: torch.Generator | None = None, **options: object) -> None:
        super().__init__()
        o = resolve_options("CriterionCIRKDMemory", self.OPTIONS, options)
        self.options, self.num_classes, self.ignore_label, self.rng = o, int(num_classes), int(ignore_label), rng
        k, d = self.num_classes, int(teacher_channels)
        self.pixel_draw = min(o["pixel_contrast"] // k + 1, o["pixel_memory"])
        self.region_draw = min(o["region_contrast"] // k + 1, o["region_memory"])
        self.project = nn.Sequential(nn.Conv2d(student_channels, d, 1, bias=False), nn.BatchNorm2d(d),
                                     nn.ReLU(inplace=True), nn.Conv2d(d, d, 1, bias=False))
        self.register_buffer("pixel_queue", F.normalize(torch.randn(k, o["pixel_memory"], d), dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(torch.randn(k, o["region_memory"], d), dim=2))
        self.register_buffer("region_ptr", torch.zeros(k, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())

    def _randperm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.rng) if self.rng is not None else torch.randperm(n)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """Write normalised teacher vectors ``keys`` [N, D, H, W] with ``labels`` [N, H, W] (feature size)."""
        keys = keys.to(self.pixel_queue.dtype)
        size, k_max = self.pixel_queue.shape[1], self.options["pixel_update"]
        for feat, label in zip(keys.flatten(2), labels.flatten(1)):
            for c in torch.unique(label).tolist():
                if c == self.ignore_label or not 0 <= c < self.num_classes:
                    continue
                idx = (label == c).nonzero()[:, 0]
                ptr = int(self.region_ptr[c])
                self.region_queue[c, ptr] = F.normalize(feat[:, idx].mean(dim=1), dim=0)
                self.region_ptr[c] = (ptr + 1) % self.region_queue.shape[1]
                perm = self._randperm(idx.numel()).to(idx.device)
                k = min(idx.numel(), k_max)
                take = perm[:k] if self.options["enqueue"] == "authors" else idx[perm[:k]]
                vectors = F.normalize(feat[:, take].t(), dim=1)
                ptr = int(self.pixel_ptr[c])
                if ptr + k >= size:
                    self.pixel_queue[c, size - k:] = vectors
                    self.pixel_ptr[c] = 0
                else:
                    self.pixel_queue[c, ptr:ptr + k] = vectors
                    self.pixel_ptr[c] = (ptr + k) % size

    def _contrast(self, s: Tensor, t: Tensor, bank: Tensor) -> Tensor:
        tau, kd_tau = self.options["tau"], self.options["kd_tau"]
        x = bank.to(s.dtype)
        ls = F.log_softmax(s @ x.t() / tau / kd_tau, dim=1)
        lt = F.log_softmax(t @ x.t() / tau / kd_tau, dim=1)
        return (lt.exp() * (lt - ls)).sum() / s.shape[0] * kd_tau ** 2

    def parts(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        if labels is None:
            raise ValueError("CriterionCIRKDMemory needs the labels (pass labels=)")
        s = _match_size(s, t, True, "CriterionCIRKDMemory")
        projected = self.project(s)
        with _fp32_region(s.device):
            t = F.normalize(wide(t.detach()), p=2, dim=1)
            ps = F.normalize(wide(projected), p=2, dim=1)
            lab = _labels_at(labels, t.shape[-2:])
            self.enqueue(t, lab)
            valid = lab.flatten() != self.ignore_label
            s_rows = ps.permute(0, 2, 3, 1).reshape(-1, ps.shape[1])[valid]
            t_rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[valid]
            if s_rows.shape[0] == 0:   # the reference returns before drawing, so do we
                zero = ps.sum() * 0
                return {"pixel": zero, "region": zero}
            pixel_index = self._randperm(self.pixel_queue.shape[1])[:self.pixel_draw].to(t.device)
            region_index = self._randperm(self.region_queue.shape[1])[:self.region_draw].to(t.device)
            pixel_bank = self.pixel_queue[:, pixel_index].reshape(-1, t.shape[1])
            region_bank = self.region_queue[:, region_index].reshape(-1, t.shape[1])
            return {"pixel": self._contrast(s_rows, t_rows, pixel_bank),
                    "region": self._contrast(s_rows, t_rows, region_bank)}

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        p = self.parts(s, t, labels)
        return self.options["pixel"] * p["pixel"] + self.options["region"] * p["region"]
