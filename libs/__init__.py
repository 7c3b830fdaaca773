"""The normalisation layer of the original networks (InPlace-ABN), in plain PyTorch."""
from libs.abn import ABN, convert_sync_abn

__all__ = ["ABN", "convert_sync_abn"]
