"""Channel-wise knowledge distillation (CWD, ICCV 2021) for semantic segmentation: the ``cwdseg`` package."""
from setuptools import find_packages, setup

setup(
    name="cwdseg",
    version="0.2.0",
    description="Knowledge distillation for semantic segmentation, built around channel-wise distillation (CWD)",
    python_requires=">=3.9",
    # One top-level name: the scripts (train.py, evaluate.py, tools/, benchmarks/) stay in the checkout.
    packages=find_packages(include=["cwdseg", "cwdseg.*"]),
    # The recipe files (``configs/`` in the checkout links to them) travel with the package.
    package_data={"cwdseg": ["configs/*.yaml", "configs/*/*.yaml"]},
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
        # Typed run configurations and recipe files (structured configs over dataclasses, YAML).
        "omegaconf>=2.3,<2.4",
        "PyYAML>=5.4",
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
        # train.py --log-to: each tracker's own client (tested with tensorboard 2.21.0, mlflow-skinny 3.18.0,
        # wandb 0.31.0; none pulls torch; the three install in ~25 s)
        "tensorboard": ["tensorboard>=2.16,<3"],
        "mlflow": ["mlflow-skinny>=2.16,<4"],
        "wandb": ["wandb>=0.20,<1"],
        "test": ["pytest>=7", "pyspng>=0.1.2", "onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.1",
                 "safetensors>=0.4", "submitit>=1.5", "av>=12",
                 "tensorboard>=2.16,<3", "mlflow-skinny>=2.16,<4", "wandb>=0.20,<1", "ruff==0.17.6",
                 "transformers==5.23.0", "scipy>=1.9"],
    },
)
