"""The inputs of ``predict.py``: images, folders, globs and video files, read as BGR uint8 frames.

Images are decoded with ``cv2.imread``; videos with OpenCV's ``VideoCapture`` (default) or PyAV
(``decoder="pyav"``, for containers the OpenCV build cannot open). An unreadable file is a
:class:`MediaError` naming it, raised when it is reached; an input that matches nothing is an error up
front. Annotated videos are written with ``cv2.VideoWriter``.
"""
from __future__ import annotations

import glob
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DECODERS = ("opencv", "pyav")
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}


class MediaError(RuntimeError):
    """An input that cannot be found or read, or an output that cannot be written; names the file."""


@dataclass(frozen=True)
class MediaItem:
    """One input file: ``kind`` is ``"image"`` or ``"video"``."""

    path: Path
    kind: str


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def discover(inputs: list[str]) -> list[MediaItem]:
    """Each input is a file (image or video), a folder (its images and videos, sorted) or a glob pattern."""
    items: list[MediaItem] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = [MediaItem(p, k) for p in sorted(path.iterdir()) if p.is_file() and (k := _kind(p))]
            if not found:
                raise MediaError(f"{path}: the folder holds no image or video files "
                                 f"({', '.join(IMAGE_EXTENSIONS[:3] + VIDEO_EXTENSIONS[:2])}, ...)")
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise MediaError(f"{path}: not an image or video file name (expected one of "
                                 f"{' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})")
            found = [MediaItem(path, kind)]
        elif glob.has_magic(text):
            found = [MediaItem(Path(p), k) for p in sorted(glob.glob(text, recursive=True))
                     if Path(p).is_file() and (k := _kind(Path(p)))]
            if not found:
                raise MediaError(f"{text}: the pattern matches no image or video file")
        else:
            raise MediaError(f"{path}: no such file or folder")
        items += found
    return items


def truncated_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG stream without its end-of-image marker (FF D9): libjpeg decodes such a
    file anyway, grey below the cut, with only a warning on stderr. Trailing zero padding is allowed."""
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\0").endswith(b"\xff\xd9")


def read_image(path: Path) -> np.ndarray:
    """A BGR uint8 image (grey and 16-bit images are converted), or a :class:`MediaError` naming the file
    (unreadable, or a truncated JPEG, which OpenCV would otherwise decode half grey)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if truncated_jpeg(data):
        raise MediaError(f"{path}: truncated JPEG (the file ends before its end-of-image marker); "
                         f"download or copy it again, or remove it")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise MediaError(f"{path}: cannot be read as an image (corrupt, empty or unsupported); fix or remove it")
    return image


def video_info(path: Path, decoder: str = "opencv") -> tuple[int, float]:
    """``(frame count (0 if unknown), frames per second)`` of a video file."""
    if decoder == "pyav":
        av = _import_av()
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                return int(stream.frames or 0), float(stream.average_rate or 25.0)
        except Exception as exc:
            raise MediaError(f"{path}: PyAV cannot open it as a video ({exc})") from None
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"{path}: OpenCV cannot open it as a video (corrupt or unsupported codec); "
                             f"try --decoder pyav")
        fps = cap.get(cv2.CAP_PROP_FPS)
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))), float(fps) if fps and fps > 0 else 25.0
    finally:
        cap.release()


def _import_av():
    try:
        import av
    except ImportError:
        raise MediaError("--decoder pyav needs PyAV: pip install -e '.[video]'") from None
    return av


def read_video(path: Path, decoder: str = "opencv", max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The frames of a video as BGR uint8 arrays, in order; an undecodable file is a :class:`MediaError`."""
    count = 0
    if decoder == "pyav":
        av = _import_av()
        try:
            with av.open(str(path)) as container:
                for frame in container.decode(video=0):
                    if max_frames is not None and count >= max_frames:
                        return
                    count += 1
                    yield frame.to_ndarray(format="bgr24")
        except av.FFmpegError as exc:
            raise MediaError(f"{path}: PyAV cannot decode it ({exc})") from None
    else:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise MediaError(f"{path}: OpenCV cannot open it as a video (corrupt or unsupported codec); "
                             f"try --decoder pyav")
        try:
            while max_frames is None or count < max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                count += 1
                yield frame
        finally:
            cap.release()
    if count == 0:
        raise MediaError(f"{path}: no frame could be decoded from this video")


class VideoSink:
    """An annotated video, written frame by frame with ``cv2.VideoWriter`` (size fixed by the first frame)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps, self.writer = path, fps, None

    def write(self, frame_bgr: np.ndarray) -> None:
        if self.writer is None:
            codec = VIDEO_CODECS.get(self.path.suffix.lower(), "mp4v")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = frame_bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codec), self.fps, (width, height))
            if not self.writer.isOpened():
                raise MediaError(f"{self.path}: OpenCV cannot write a video here with codec {codec} "
                                 f"(use --video-ext .avi or check the folder)")
        self.writer.write(frame_bgr)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def prefetch(iterator: Iterator, depth: int = 4) -> Iterator:
    """Run ``iterator`` in a background thread (decoding overlaps inference); its exceptions re-raise here."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as exc:  # handed to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
