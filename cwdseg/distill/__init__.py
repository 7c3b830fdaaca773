"""Distillation terms, one module per family, and the segmentation task loss.

- :mod:`cwdseg.distill.cwd`: channel-wise distillation (CWD), on logits or feature maps.
- :mod:`cwdseg.distill.kd`: pixel-wise KD ("PI").
- :mod:`cwdseg.distill.adversarial`: holistic WGAN-GP distillation ("HO").
- :mod:`cwdseg.distill.task`: cross-entropy on the main and auxiliary logits.
"""
from cwdseg.distill.adversarial import discriminator_wgan_gp_loss, generator_adversarial_loss, gradient_penalty
from cwdseg.distill.cwd import DIVERGENCES, NORM_TYPES, CriterionCWD
from cwdseg.distill.kd import CriterionKD
from cwdseg.distill.task import CriterionDSN

__all__ = [
    "CriterionCWD", "CriterionDSN", "CriterionKD", "DIVERGENCES", "NORM_TYPES",
    "discriminator_wgan_gp_loss", "generator_adversarial_loss", "gradient_penalty",
]
