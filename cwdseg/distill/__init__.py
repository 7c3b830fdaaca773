"""Distillation terms, one module per family, and the segmentation task loss.

- :mod:`cwdseg.distill.cwd`: channel-wise distillation (CWD), on logits or feature maps.
- :mod:`cwdseg.distill.kd`: pixel-wise KD ("PI").
- :mod:`cwdseg.distill.adversarial`: holistic WGAN-GP distillation ("HO").
- :mod:`cwdseg.distill.task`: cross-entropy on the main and auxiliary logits.
- The comparison of the paper's Table 2 and later methods: :mod:`~cwdseg.distill.at` (AT),
  :mod:`~cwdseg.distill.local` (LOCAL), :mod:`~cwdseg.distill.pairwise` (PA), :mod:`~cwdseg.distill.ifvd`
  (IFVD), :mod:`~cwdseg.distill.fitnet` (FitNet), :mod:`~cwdseg.distill.dist` (DIST).
- Methods published after CWD (issue 22): :mod:`~cwdseg.distill.cirkd` (CIRKD mini-batch relation and
  memory contrast), :mod:`~cwdseg.distill.mgd` (MGD), :mod:`~cwdseg.distill.afdcd` (Af-DCD),
  :mod:`~cwdseg.distill.lskd` (logit-standardised KD, CIRKD's pixel KD), :mod:`~cwdseg.distill.bpkd` (BPKD);
  their options with bounds in :mod:`~cwdseg.distill.options`.
- :mod:`cwdseg.distill.taps`: read any layer of a model by module path or alias (forward hooks).
- :mod:`cwdseg.distill.registry`: the terms by name, what each needs, the ``--distill`` parser, presets.
"""
from cwdseg.distill.adversarial import discriminator_wgan_gp_loss, generator_adversarial_loss, gradient_penalty
from cwdseg.distill.afdcd import CriterionAfDCD
from cwdseg.distill.bpkd import CriterionBPKD
from cwdseg.distill.cirkd import CriterionCIRKDMemory, CriterionCIRKDMiniBatch
from cwdseg.distill.cwd import DIVERGENCES, NORM_TYPES, CriterionCWD
from cwdseg.distill.kd import CriterionKD
from cwdseg.distill.lskd import CriterionLSKD
from cwdseg.distill.mgd import CriterionMGD
from cwdseg.distill.options import Option, OptionError
from cwdseg.distill.taps import TapError, TapRecorder
from cwdseg.distill.task import CriterionDSN

__all__ = [
    "CriterionCWD", "CriterionDSN", "CriterionKD", "DIVERGENCES", "NORM_TYPES",
    "CriterionAfDCD", "CriterionBPKD", "CriterionCIRKDMemory", "CriterionCIRKDMiniBatch", "CriterionLSKD",
    "CriterionMGD", "Option", "OptionError", "TapError", "TapRecorder",
    "discriminator_wgan_gp_loss", "generator_adversarial_loss", "gradient_penalty",
]
