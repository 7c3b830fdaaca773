"""Datasets: Cityscapes (label table, lists, Dataset/DataLoader) and the registry of the other layouts
(pascal_voc, ade20k, camvid, folder: ``cwdseg.data.registry``), preprocessing, synthetic generators."""
from cwdseg.data.base import SegmentationDataset
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
from cwdseg.data.info import DatasetInfo
from cwdseg.data.labels import (
    CLASS_NAMES,
    IGNORE_LABEL,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    TRAIN_ID_COLORS,
    TRAIN_ID_TO_LABEL_ID,
)
from cwdseg.data.registry import DATASETS, build_dataset, dataset_info


def __getattr__(name: str):
    # Lazy, so that `python -m cwdseg.data.synthetic` does not import its own module twice (runpy warning).
    if name == "generate":
        from cwdseg.data.synthetic import generate

        return generate
    if name == "generate_dataset":
        from cwdseg.data.synthetic_zoo import generate_dataset

        return generate_dataset
    raise AttributeError(f"module 'cwdseg.data' has no attribute {name!r}")

__all__ = [
    "IMG_MEAN_BGR", "CityscapesDataset", "DatasetError", "Sample", "build_loader",
    "read_image", "read_label", "read_list_file", "scan_split", "worker_init_fn",
    "CLASS_NAMES", "IGNORE_LABEL", "LABEL_ID_TO_TRAIN_ID", "NUM_CLASSES", "TRAIN_ID_COLORS",
    "TRAIN_ID_TO_LABEL_ID", "generate", "SegmentationDataset", "DatasetInfo", "DATASETS", "build_dataset",
    "dataset_info", "generate_dataset",
]
