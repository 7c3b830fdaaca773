"""Pictures: colour maps and panels (:mod:`.segmaps`), overlays with a class legend (:mod:`.overlay`),
training curves (:mod:`.curves`), per-class IoU bars (:mod:`.bars`) and CWD's channel distributions
(:mod:`.channels`)."""
