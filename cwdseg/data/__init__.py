"""Cityscapes data: label table, sample lists, preprocessing, Dataset/DataLoader, synthetic generator."""
from cwdseg.data.cityscapes import (
    IMG_MEAN_BGR,
    CityscapesDataset,
    DatasetError,
    Sample,
    build_loader,
    read_image,
    read_label,
    read_list_file,
    scan_split,
    worker_init_fn,
)
from cwdseg.data.labels import (
    CLASS_NAMES,
    IGNORE_LABEL,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    TRAIN_ID_COLORS,
    TRAIN_ID_TO_LABEL_ID,
)


def __getattr__(name: str):
    # Lazy, so that `python -m cwdseg.data.synthetic` does not import its own module twice (runpy warning).
    if name == "generate":
        from cwdseg.data.synthetic import generate

        return generate
    raise AttributeError(f"module 'cwdseg.data' has no attribute {name!r}")

__all__ = [
    "IMG_MEAN_BGR", "CityscapesDataset", "DatasetError", "Sample", "build_loader",
    "read_image", "read_label", "read_list_file", "scan_split", "worker_init_fn",
    "CLASS_NAMES", "IGNORE_LABEL", "LABEL_ID_TO_TRAIN_ID", "NUM_CLASSES", "TRAIN_ID_COLORS",
    "TRAIN_ID_TO_LABEL_ID", "generate",
]
