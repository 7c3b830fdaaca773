"""Channel-wise distillation (CWD, Shu et al., ICCV 2021): the loss and its normalisation variants.

Every loss is computed in float32 with autocast disabled, whatever the precision of its inputs:
the softmax over H*W positions of a logit map (CWD) and the gradient penalty's double backward are
the two places where bf16/fp16 loses digits or overflows. The inputs are upcast, not the networks,
so the cost is a few small elementwise kernels (see ``benchmarks/bench_losses.py``).

NOTE (for the README) -- deliberate departures from the original ``utils/criterion.py``:

* CWD ``norm_type="none"`` used only the first image of the batch (``preds_S[0]``) while dividing
  by the whole batch size N*H*W. Here it sums over all N images (then divides by N*H*W).
* CWD with KL uses ``log_softmax`` on both sides instead of ``softmax(...).log()`` for the student.
  Mathematically identical; it cannot produce -inf/NaN when a probability underflows (AMP).
* CWD ``kl`` with ``norm_type`` ``"channel_mean"`` or ``"none"`` takes the log of a spatial mean or
  of the raw map, as the original does; such values are meaningless and non-positive inputs gave
  NaN there. Here non-positive inputs raise a ``ValueError`` (the check synchronises with the
  device, but only in these two modes, which no recipe uses).
* Unknown ``norm_type``/``divergence`` raise ``ValueError`` (the original silently used ``none``,
  or crashed later).
* Student/teacher maps of different shapes raise a ``ValueError`` naming both shapes (the original
  failed inside ``KLDivLoss`` or broadcast silently); ``CriterionCWD(resize=True)`` resizes the
  student map to the teacher's spatial size instead.
* ``CriterionDSN`` divides by ``max(1, number of valid pixels)``: a crop whose pixels are all 255
  gives 0 instead of NaN.
* ``CriterionKD`` multiplies by T**2 (Hinton's scaling); the original did not, which is the same at
  its only used value T = 1.
* The optional CWD ignore mask is an extension (off by default); see :class:`CriterionCWD`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _check_4d, _fp32_region

NORM_TYPES = ("channel", "spatial", "channel_mean", "none")
DIVERGENCES = ("kl", "mse")


# --------------------------------------------------------------------------------------------------
# Channel-wise distillation
# --------------------------------------------------------------------------------------------------
class CriterionCWD(nn.Module):
    r"""Channel-wise distillation (Shu et al., ICCV 2021) and the normalisation variants of the paper.

    With ``norm_type="channel"`` and ``divergence="kl"`` (the CWD recipe), for student/teacher maps
    z^S, z^T of shape [N, C, H, W] and p^X_{n,c,i} = softmax_i(z^X_{n,c,i} / tau) over the H*W
    positions i of each channel:

    .. math:: L = \frac{\tau^2}{N C} \sum_{n,c} \sum_i p^T_{n,c,i} (\log p^T_{n,c,i} - \log p^S_{n,c,i})

    i.e. KL(teacher || student), the original's ``KLDivLoss(reduction='sum')(log p_S, p_T)``.
    The teacher map is detached: no gradient ever reaches it.

    Normalisations (both maps are divided by tau first, except for ``"none"``):

    * ``"channel"``: softmax over H*W per (n, c). Denominator N*C.
    * ``"spatial"``: softmax over C per pixel (pixel-wise KD with temperature). Denominator N*H*W.
    * ``"channel_mean"``: the spatial mean per (n, c), a [N, C] vector. Denominator N*C. With ``kl``
      the original takes the *log of the mean* of the (unnormalised) maps -- reproduced here but
      meaningless as a divergence; it needs positive means (``ValueError`` otherwise). With ``mse``
      it is sum((m^S - m^T)^2) / (N*C).
    * ``"none"``: the raw maps, *not* divided by tau (as the original). Denominator N*H*W. The
      original used only the first image of the batch; fixed here (all N images). With ``kl`` it
      takes the log of the raw student map (needs positive values, ``ValueError`` otherwise).

    Divergences: ``kl`` as above; ``mse`` = sum((q^S - q^T)^2) over the normalised maps q. As in the
    original, ``mse`` forces tau = 1 (the requested temperature is ignored). Every mode multiplies
    by tau**2 at the end (1 for ``mse``). Computed in float32 with autocast off; the KL uses
    ``log_softmax`` on both sides.

    Shapes: student and teacher must have the same [N, C, H, W]. A spatial mismatch is an error
    unless ``resize=True`` (bilinear, ``align_corners=True``, student resized to the teacher's
    H, W). A channel mismatch is always an error: use the feature connector
    (``networks.connector.FeatureConnector``, ``--cwd-feat True``) on the student first.

    Ignore mask (extension, off unless a mask is passed): ``ignore_mask`` is a bool [N, H, W] at the
    teacher map's size, True at positions to ignore (build it with :meth:`mask_from_labels`).

    * ``"channel"``: ignored positions are removed from the spatial softmax of *both* maps (their
      logits set to -inf), so each channel is a distribution over the valid positions only, and they
      add nothing to the sum. An image with no valid position contributes 0; the denominator is
      C times the number of images that have at least one valid position.
    * ``"channel_mean"``: the mean runs over valid positions only; denominator as for ``"channel"``.
    * ``"spatial"`` / ``"none"``: ignored pixels add nothing to the sum, and the denominator is the
      number of valid pixels (instead of N*H*W).

    With no valid position at all the loss is 0 (still attached to the graph).

    Args:
        norm_type: ``"channel"`` | ``"spatial"`` | ``"channel_mean"`` | ``"none"``.
        divergence: ``"kl"`` | ``"mse"``.
        temperature: tau (used with ``kl`` only).
        resize: resize the student map to the teacher's spatial size when they differ.

    Forward: ``forward(preds_S [N,C,H,W], preds_T [N,C,H',W'], ignore_mask=None) -> scalar Tensor``
    (float32).
    """

    def __init__(
        self,
        norm_type: str = "channel",
        divergence: str = "kl",
        temperature: float = 4.0,
        resize: bool = False,
        ignore_labels: bool = False,
        ignore_label: int = 255,
    ) -> None:
        super().__init__()
        if norm_type not in NORM_TYPES:
            raise ValueError(f"CriterionCWD: norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"CriterionCWD: divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if not temperature > 0:
            raise ValueError(f"CriterionCWD: temperature must be > 0, got {temperature!r}")
        self.norm_type = norm_type
        self.divergence = divergence
        # The original sets tau = 1 unless the divergence is KL.
        self.temperature = float(temperature) if divergence == "kl" else 1.0
        self.resize = resize
        # Extension: with ignore_labels, pixels labelled ignore_label leave CWD (off in the original).
        self.ignore_labels, self.ignore_label = ignore_labels, ignore_label

    def extra_repr(self) -> str:
        return (f"norm_type={self.norm_type!r}, divergence={self.divergence!r}, "
                f"temperature={self.temperature}, resize={self.resize}")

    @staticmethod
    def mask_from_labels(labels: Tensor, size: tuple[int, int], ignore_index: int = 255) -> Tensor:
        """Ignore mask at a map's size: True where the nearest-resized label equals ``ignore_index``.

        ``labels``: integer [N, H0, W0] (trainIds). ``size``: (H, W) of the map. Uses PyTorch's
        ``mode="nearest"`` (source index floor(i * H0 / H)), as the original resized labels for IFV.
        Returns a bool tensor [N, H, W] on the labels' device.
        """
        if labels.dim() != 3:
            raise ValueError(f"mask_from_labels: labels must be [N, H, W]; got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"mask_from_labels: labels must be an integer tensor; got {labels.dtype}")
        resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
        return resized == float(ignore_index)

    # -- input checks ---------------------------------------------------------------------------
    def _align(self, s: Tensor, t: Tensor) -> Tensor:
        _check_4d(s, "CriterionCWD student map")
        _check_4d(t, "CriterionCWD teacher map")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"CriterionCWD: batch sizes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"CriterionCWD: channel counts differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}. "
                "Map the student to the teacher's channels first with a 1x1 connector "
                "(networks.connector.FeatureConnector; --cwd-feat True does this for the PSP feature)."
            )
        if s.shape[2:] != t.shape[2:]:
            if not self.resize:
                raise ValueError(
                    f"CriterionCWD: spatial sizes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}. "
                    "Pass resize=True to resize the student map bilinearly to the teacher's size."
                )
            s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=True)
        return s

    # -- the loss -------------------------------------------------------------------------------
    def forward(self, preds_S: Tensor, preds_T: Tensor, labels: Tensor | None = None,
                ignore_mask: Tensor | None = None) -> Tensor:
        """``labels`` (the terms' common signature) give the ignore mask when built with ``ignore_labels``;
        ``ignore_mask`` passes one directly."""
        if ignore_mask is None and self.ignore_labels and labels is not None:
            ignore_mask = self.mask_from_labels(labels, preds_T.shape[-2:], self.ignore_label)
        if isinstance(preds_S, (tuple, list)) or isinstance(preds_T, (tuple, list)):
            raise TypeError("CriterionCWD takes maps [N,C,H,W], not model output tuples: pass preds[0] (logits) "
                            "or connector(preds_S[2]), preds_T[2] (features)")
        with _fp32_region(preds_S.device):
            s = preds_S.float()
            t = preds_T.detach().float()
            s = self._align(s, t)
            n, c, h, w = t.shape
            valid = None
            if ignore_mask is not None:
                if ignore_mask.dtype != torch.bool or tuple(ignore_mask.shape) != (n, h, w):
                    raise ValueError(
                        f"CriterionCWD: ignore_mask must be a bool tensor of shape {(n, h, w)} (the teacher map's "
                        f"N, H, W); got {ignore_mask.dtype} {tuple(ignore_mask.shape)}. "
                        "Build it with CriterionCWD.mask_from_labels(labels, (H, W))."
                    )
                valid = ~ignore_mask.to(t.device)
            tau = self.temperature
            if self.norm_type == "channel":
                loss = self._channel(s / tau, t / tau, valid)
            elif self.norm_type == "spatial":
                loss = self._spatial(s / tau, t / tau, valid)
            elif self.norm_type == "channel_mean":
                loss = self._channel_mean(s / tau, t / tau, valid)
            else:
                loss = self._none(s, t, valid)
            return loss * (tau ** 2)

    def _divergence_terms(self, log_or_val_s: Tensor, log_or_val_t: Tensor) -> Tensor:
        """Elementwise terms of the divergence between two normalised maps.

        For ``kl`` the inputs are log-probabilities: p_T * (log p_T - log p_S).
        For ``mse`` they are the probabilities/values themselves: (q_S - q_T)^2.
        """
        if self.divergence == "kl":
            return log_or_val_t.exp() * (log_or_val_t - log_or_val_s)
        return (log_or_val_s - log_or_val_t) ** 2

    def _channel(self, s: Tensor, t: Tensor, valid: Tensor | None) -> Tensor:
        n, c, h, w = s.shape
        s = s.reshape(n, c, h * w)
        t = t.reshape(n, c, h * w)
        if valid is None:
            ls, lt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
            if self.divergence == "mse":
                ls, lt = ls.exp(), lt.exp()
            return self._divergence_terms(ls, lt).sum() / (n * c)
        v = valid.reshape(n, 1, h * w)
        has_valid = v.any(dim=-1, keepdim=True)  # [n,1,1]
        # Images with no valid position keep all positions in the softmax (no -inf row -> no NaN)
        # and are zeroed below.
        keep = v | ~has_valid
        neg_inf = torch.tensor(float("-inf"), device=s.device, dtype=s.dtype)
        ls = F.log_softmax(torch.where(keep, s, neg_inf), dim=-1)
        lt = F.log_softmax(torch.where(keep, t, neg_inf), dim=-1)
        if self.divergence == "mse":
            ls, lt = ls.exp(), lt.exp()
        terms = torch.where(v, self._divergence_terms(ls, lt), torch.zeros((), device=s.device))
        n_valid = has_valid.sum().clamp_min(1)
        return terms.sum() / (n_valid * c)

    def _spatial(self, s: Tensor, t: Tensor, valid: Tensor | None) -> Tensor:
        n, c, h, w = s.shape
        ls, lt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
        if self.divergence == "mse":
            ls, lt = ls.exp(), lt.exp()
        terms = self._divergence_terms(ls, lt)
        if valid is None:
            return terms.sum() / (n * h * w)
        per_pixel = terms.sum(dim=1)  # [n,h,w]
        per_pixel = torch.where(valid, per_pixel, torch.zeros((), device=s.device))
        return per_pixel.sum() / valid.sum().clamp_min(1)

    def _channel_mean(self, s: Tensor, t: Tensor, valid: Tensor | None) -> Tensor:
        n, c, h, w = s.shape
        if valid is None:
            ms, mt = s.mean(dim=(2, 3)), t.mean(dim=(2, 3))
            n_img = n
        else:
            vf = valid[:, None].to(s.dtype)  # [n,1,h,w]
            count = vf.sum(dim=(2, 3))  # [n,1]
            ms = (s * vf).sum(dim=(2, 3)) / count.clamp_min(1)
            mt = (t * vf).sum(dim=(2, 3)) / count.clamp_min(1)
            has_valid = count > 0  # [n,1]
            n_img = has_valid.sum().clamp_min(1)
        terms = self._log_of_values_terms(ms, mt, "channel_mean", None if valid is None else has_valid)
        if valid is not None:
            terms = torch.where(has_valid, terms, torch.zeros((), device=s.device))
        return terms.sum() / (n_img * c)

    def _none(self, s: Tensor, t: Tensor, valid: Tensor | None) -> Tensor:
        n, c, h, w = s.shape
        terms = self._log_of_values_terms(s, t, "none", None if valid is None else valid[:, None])
        if valid is None:
            return terms.sum() / (n * h * w)
        per_pixel = torch.where(valid, terms.sum(dim=1), torch.zeros((), device=s.device))
        return per_pixel.sum() / valid.sum().clamp_min(1)

    def _log_of_values_terms(self, s: Tensor, t: Tensor, mode: str, valid: Tensor | None) -> Tensor:
        """Terms for the modes that do not softmax: KL takes the log of the values themselves.

        ``valid`` (broadcastable to ``s``) marks the entries that count; the caller zeroes the
        others, and for KL they are replaced by 1 here so they neither fail the positivity check
        nor produce NaN (log of a masked-out value).
        """
        if self.divergence == "mse":
            return (s - t) ** 2
        if valid is not None:
            one = torch.ones((), device=s.device, dtype=s.dtype)
            s = torch.where(valid, s, one)
            t = torch.where(valid, t, one)
        # KLDivLoss(sum)(log s, t) = sum xlogy(t, t) - t * log s: defined only for s > 0, t >= 0.
        if bool((s <= 0).any()) or bool((t < 0).any()):
            raise ValueError(
                f"CriterionCWD(norm_type={mode!r}, divergence='kl') takes the log of the "
                f"{'spatial means' if mode == 'channel_mean' else 'raw maps'}, which must be positive "
                f"(student min {s.min().item():.4g}, teacher min {t.min().item():.4g}); the original gave NaN here. "
                "Use divergence='mse' or norm_type='channel'."
            )
        return torch.xlogy(t, t) - t * torch.log(s)
