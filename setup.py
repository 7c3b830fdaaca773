"""Channel-wise knowledge distillation (CWD, ICCV 2021) for semantic segmentation on Cityscapes."""
from setuptools import setup

setup(
    name="cwd-seg",
    version="0.1.0",
    description="Channel-wise knowledge distillation for semantic segmentation (PSPNet-R101 -> PSPNet-R18, Cityscapes)",
    python_requires=">=3.9",
    packages=["libs", "networks", "dataset", "utils"],
    py_modules=["train", "evaluate"],
    install_requires=[
        # A lower bound only: an installed torch (CPU or CUDA build) is kept as it is.
        "torch>=2.1",
        "numpy>=1.23",
        "opencv-python-headless>=4.6",
        "cityscapesscripts>=2.2",
        "tqdm>=4.60",
        "matplotlib>=3.5",
    ],
    extras_require={
        # libspng PNG decoding: identical pixels, ~1.4x faster training-sample loading
        "fast-png": ["pyspng>=0.1.2"],
        "test": ["pytest>=7", "pyspng>=0.1.2"],
    },
)
