"""Pictures: Cityscapes colour maps and panels (:mod:`.segmaps`), training curves (:mod:`.curves`)."""
