"""Channel-wise knowledge distillation (CWD, ICCV 2021) for semantic segmentation: the ``cwdseg`` package."""
from setuptools import find_packages, setup

setup(
    name="cwdseg",
    version="0.2.0",
    description="Channel-wise knowledge distillation for semantic segmentation (PSPNet-R101 -> PSPNet-R18, Cityscapes)",
    python_requires=">=3.9",
    # One top-level name: the scripts (train.py, evaluate.py, tools/, benchmarks/) stay in the checkout.
    packages=find_packages(include=["cwdseg", "cwdseg.*"]),
    entry_points={"console_scripts": [
        "cwd-train = cwdseg.cli.train:cli",
        "cwd-eval = cwdseg.cli.evaluate:cli",
    ]},
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
        # tools/export.py and predict.py on ONNX files
        "export": ["onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.1", "safetensors>=0.4"],
        # tools/run_grid.py on a Slurm cluster; PyAV for video files OpenCV cannot read
        "cluster": ["submitit>=1.5"],
        "video": ["av>=12"],
        # SegFormer (segformer_b0 ... b5): transformers' modules; pinned because the model's state_dict keys
        # are transformers' in-memory names (5.x renamed them); it installs beside any torch >= 2.1
        "segformer": ["transformers==5.23.0", "safetensors>=0.4"],
        "test": ["pytest>=7", "pyspng>=0.1.2", "onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.1",
                 "safetensors>=0.4", "submitit>=1.5", "av>=12", "transformers==5.23.0"],
    },
)
