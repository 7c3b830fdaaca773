"""FitNet-style feature regression (Romero et al., ICLR 2015), through a connector."""
from __future__ import annotations

from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size


class CriterionFitNet(nn.Module):
    r"""Mean squared error between the connected student map and the teacher map.

    .. math:: L = \frac{1}{N C H W} \sum_{n,c,h,w} (r(z^S)_{n,c,h,w} - z^T_{n,c,h,w})^2

    where r is the regressor (connector) applied by the caller: a bias-free 1x1 conv from the
    student's to the teacher's channels, as ``winycg/CIRKD`` ``losses/fitnet.py`` (whose loss is
    the same plain mean). FitNet's original regressor was a conv on a hint layer with two-stage
    training; here it is trained jointly, as CIRKD does. Teacher detached; float32 with autocast off.

    ``forward(r(s) [N,C,H,W], t [N,C,H',W'], labels=None) -> scalar``; channels must agree.
    """

    def __init__(self, resize: bool = True) -> None:
        super().__init__()
        self.resize = resize

    def extra_repr(self) -> str:
        return f"resize={self.resize}"

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"CriterionFitNet: channel counts differ: student {tuple(s.shape)} vs teacher "
                             f"{tuple(t.shape)}; apply the regressor (connector) to the student map first")
        with _fp32_region(s.device):
            t = t.detach().float()
            s = _match_size(s.float(), t, self.resize, "CriterionFitNet")
            return (s - t).pow(2).mean()
