"""Distillation terms, one module per family, and the segmentation task loss.

- :mod:`cwdseg.distill.cwd`: channel-wise distillation (CWD), on logits or feature maps.
- :mod:`cwdseg.distill.kd`: pixel-wise KD ("PI").
- :mod:`cwdseg.distill.adversarial`: holistic WGAN-GP distillation ("HO").
- :mod:`cwdseg.distill.task`: cross-entropy on the main and auxiliary logits.
- The comparison of the paper's Table 2 and later methods: :mod:`~cwdseg.distill.at` (AT),
  :mod:`~cwdseg.distill.local` (LOCAL), :mod:`~cwdseg.distill.pairwise` (PA), :mod:`~cwdseg.distill.ifvd`
  (IFVD), :mod:`~cwdseg.distill.fitnet` (FitNet), :mod:`~cwdseg.distill.dist` (DIST).
- :mod:`cwdseg.distill.registry`: the terms by name, what each needs, the ``--distill`` parser, presets.
"""
from cwdseg.distill.adversarial import discriminator_wgan_gp_loss, generator_adversarial_loss, gradient_penalty
from cwdseg.distill.cwd import DIVERGENCES, NORM_TYPES, CriterionCWD
from cwdseg.distill.kd import CriterionKD
from cwdseg.distill.task import CriterionDSN

__all__ = [
    "CriterionCWD", "CriterionDSN", "CriterionKD", "DIVERGENCES", "NORM_TYPES",
    "discriminator_wgan_gp_loss", "generator_adversarial_loss", "gradient_penalty",
]
