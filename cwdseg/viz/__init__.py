"""Pictures: colour maps and panels (:mod:`.segmaps`), overlays with a class legend (:mod:`.overlay`),
training curves (:mod:`.curves`), per-class IoU bars (:mod:`.bars`), CWD's channel distributions
(:mod:`.channels`) and the spread over seeds (:mod:`.seeds`)."""
