"""The data room's one error type (its own module, so that every data module can raise it without
importing the Cityscapes module)."""
from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(RuntimeError):
    """Bad or missing dataset input; the message names the file and what to do.

    Raised in a DataLoader worker, it reaches the main process re-built from torch's text
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ... DatasetError: <message>");
    only ``<message>`` is kept, so the user sees the one clear line and not the worker's traceback.
    """

    _WORKER_PREFIX = "Caught DatasetError in DataLoader worker"

    def __init__(self, message: str = "") -> None:
        if isinstance(message, str) and message.startswith(self._WORKER_PREFIX) and "DatasetError: " in message:
            message = message.rsplit("DatasetError: ", 1)[1].strip() + " (raised in a data loader worker)"
        super().__init__(message)
