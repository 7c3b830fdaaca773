"""Decoded-image cache on disk: (image path, label path) pairs -> uint8 arrays, read by memory-mapping.

PNG decoding is most of a training sample's cost (~26 ms of ~30 ms for a 1024x2048 Cityscapes image on one
core). This cache decodes every pair once into one flat file of raw uint8 pixels; the loader then maps that
file read-only (``numpy.memmap``) and crops the uint8 views directly, so a sample costs a crop, a lookup
table and a copy. The mapping is shared by every worker and every process of a machine through the page
cache: the data is in RAM once (as with ``--cache-images``) without being copied into any process.

The cache knows no dataset: it stores whatever ``load_pair(image_path, label_path)`` returns (the dataset's
own checked decoder), image (H, W, 3) uint8 and label (H, W) uint8 or None, unchanged (labels are *raw*, e.g.
labelIds, so the dataset maps them exactly as on the PNG path and samples stay bit-identical).

Files under the cache folder, per source list (named by a digest of its paths)::

    <key>.u8     every entry's image bytes then its label bytes, back to back
    <key>.json   the index: format version, source-list checksum, data size, per entry (image, label,
                 height, width, offset, crc32 of its bytes)

Safety:

- built atomically: both files are written under temporary names, flushed, then renamed, the index last;
  a build that dies leaves no index, so nothing half-written is ever opened. A lock file serialises
  builders, so processes that start together (the ranks of one machine) build it once;
- validated on open: format version, the data file's size against the index, contiguous offsets, and a
  SHA-256 of the source list (every path with its size and modification time); a cache whose sources
  changed is *stale*. A stale or damaged cache is rebuilt (``build=True``, saying why) or refused with an
  :class:`ImageCacheError` naming the file and the fix -- never read;
- ``verify()`` (``python -m cwdseg.data cache --verify``) re-reads every entry against its crc32, which
  catches damage inside the data that a size check cannot see.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cwdseg.data.errors import DatasetError

__all__ = ["CACHE_FORMAT", "ImageCacheError", "ImageCache", "open_image_cache", "source_checksum", "cache_key"]

CACHE_FORMAT = 1  # bump when the layout of the files changes
Pair = tuple[str, "str | None"]
LoadPair = Callable[[str, "str | None"], "tuple[np.ndarray, np.ndarray | None]"]


class ImageCacheError(DatasetError):
    """A missing, stale or damaged image cache; the message names the file and the fix."""


def cache_key(pairs: Sequence[Pair]) -> str:
    """File stem of a source list's cache: a digest of its paths (so each list has its own cache)."""
    digest = hashlib.sha256()
    for image, label in pairs:
        digest.update(f"{image}\0{label or ''}\n".encode())
    return f"images-{digest.hexdigest()[:16]}"


def source_checksum(pairs: Sequence[Pair]) -> str:
    """SHA-256 of every source file's path, size and modification time (ns): changes when a source does."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in pair:
            if path is None:
                digest.update(b"-\n")
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ImageCacheError(f"cannot stat source file {path}: {exc}. The dataset changed under the "
                                      "cache; check the data folder.") from exc
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ImageCache:
    """Read side of a built cache: ``cache.read(image_path, label_path)`` -> read-only uint8 views.

    Pickles as its file paths and index (not its pages), so DataLoader workers started with any method map
    the same file and share its page cache.
    """

    def __init__(self, data_path: Path, index: dict) -> None:
        self.data_path = Path(data_path)
        self.index = index
        self._lookup = {(e["image"], e["label"]): k for k, e in enumerate(index["entries"])}
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {"data_path": self.data_path, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data_path"], state["index"])

    def __len__(self) -> int:
        return len(self.index["entries"])

    @property
    def nbytes(self) -> int:
        return int(self.index["data_bytes"])

    def _map(self) -> np.memmap:
        if self._data is None:
            size = self.data_path.stat().st_size if self.data_path.exists() else -1
            if size != self.nbytes:  # replaced or truncated since it was validated
                raise ImageCacheError(f"image cache {self.data_path} is {size} bytes, its index says {self.nbytes}; "
                                      "it changed after it was opened. Rebuild it with `python -m cwdseg.data cache`.")
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        return self._data

    def entry(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Entry ``k`` as read-only views of the mapped file: image (H, W, 3) and label (H, W) or None."""
        data = self._map()
        _, label_path, height, width, offset = self._fields(k)
        image_bytes = height * width * 3
        image = data[offset:offset + image_bytes].reshape(height, width, 3)
        if label_path is None:
            return image, None
        start = offset + image_bytes
        return image, data[start:start + height * width].reshape(height, width)

    def _fields(self, k: int) -> tuple[str, str | None, int, int, int]:
        e = self.index["entries"][k]
        return e["image"], e["label"], e["height"], e["width"], e["offset"]

    def read(self, image_path: str, label_path: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The decoded pair, exactly as ``load_pair`` returned it at build time (as read-only views)."""
        k = self._lookup.get((image_path, label_path))
        if k is None:
            raise ImageCacheError(f"{image_path} (label {label_path}) is not in the image cache {self.data_path}; "
                                  "the cache was built for another list. Rebuild it.")
        return self.entry(k)

    def verify(self, progress: bool = True) -> list[str]:
        """Re-read every entry against its crc32; returns the image paths of damaged entries."""
        data = self._map()
        bad = []
        entries = self.index["entries"]
        for k, e in enumerate(_progress(entries, progress, "verify cache")):
            end = entries[k + 1]["offset"] if k + 1 < len(entries) else self.nbytes
            if zlib.crc32(data[e["offset"]:end]) != e["crc32"]:
                bad.append(e["image"])
        return bad


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    return cache_dir / f"{key}.u8", cache_dir / f"{key}.json", cache_dir / f"{key}.lock"


def _problem(data_path: Path, index_path: Path, pairs: Sequence[Pair], checksum: str) -> tuple[str, dict | None]:
    """Why the cache cannot be used ("" when it can), and its index when it parsed."""
    if not index_path.is_file():
        return "not built yet", None
    try:
        index = json.loads(index_path.read_text())
        entries = index["entries"]
        version, data_bytes, source = index["format"], int(index["data_bytes"]), index["source_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its index {index_path} is unreadable ({type(exc).__name__}: {exc})", None
    if version != CACHE_FORMAT:
        return f"it has format {version}, this code reads format {CACHE_FORMAT}", None
    if [(e.get("image"), e.get("label")) for e in entries] != [tuple(p) for p in pairs]:
        return "its index lists other files than the dataset", None
    if source != checksum:
        return "stale: source files changed since it was built (size or modification time)", None
    size = data_path.stat().st_size if data_path.is_file() else None
    if size != data_bytes:
        return (f"damaged: {data_path} is {size if size is not None else 'missing'} bytes, "
                f"its index says {data_bytes}"), None
    offset = 0
    for e in entries:
        if e["offset"] != offset or e["height"] <= 0 or e["width"] <= 0:
            return f"damaged: index offsets are not contiguous at {e['image']}", None
        offset += e["height"] * e["width"] * (3 + (e["label"] is not None))
    if offset != data_bytes:
        return f"damaged: index entries add up to {offset} bytes, not {data_bytes}", None
    return "", index


def open_image_cache(
    cache_dir: str | os.PathLike,
    pairs: Sequence[Pair],
    load_pair: LoadPair,
    *,
    build: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> ImageCache:
    """Open the cache of ``pairs`` under ``cache_dir``, building it first when missing, stale or damaged.

    Args:
        cache_dir: folder of the cache files (created when missing); any number of lists may share it.
        pairs: (image path, label path or None) per sample, in the dataset's order.
        load_pair: the dataset's checked decoder, called once per pair while building.
        build: False refuses (raises :class:`ImageCacheError`) instead of building.
        threads: decoding threads while building (OpenCV and libspng release the GIL).
        log: where build messages go.
        progress: a progress bar while building.
    """
    pairs = [(str(image), None if label is None else str(label)) for image, label in pairs]
    if not pairs:
        raise ImageCacheError("an image cache needs at least one sample.")
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageCacheError(f"cannot create the image cache folder {folder}: {exc}. Pass a writable "
                              "--image-cache folder.") from exc
    key = cache_key(pairs)
    data_path, index_path, lock_path = _paths(folder, key)
    checksum = source_checksum(pairs)
    problem, index = _problem(data_path, index_path, pairs, checksum)
    if not problem:
        return ImageCache(data_path, index)
    if not build:
        raise ImageCacheError(f"image cache {index_path} cannot be used: {problem}. Build it with "
                              "`python -m cwdseg.data cache --data-dir ROOT --cache-dir DIR`.")
    with open(lock_path, "a+") as lock:  # one builder at a time; the others wait, then find it built
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            problem, index = _problem(data_path, index_path, pairs, checksum)
            if not problem:
                return ImageCache(data_path, index)
            log(f"image cache {data_path}: {problem}; building it ({len(pairs)} samples)")
            index = _build(data_path, index_path, pairs, load_pair, checksum, threads, progress, log)
            # The sources must not have changed while they were read.
            if source_checksum(pairs) != checksum:
                raise ImageCacheError(f"source files changed while the image cache {data_path} was built; "
                                      "run again once the dataset is complete.")
            return ImageCache(data_path, index)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(data_path: Path, index_path: Path, pairs: Sequence[Pair], load_pair: LoadPair, checksum: str,
           threads: int | None, progress: bool, log: Callable[[str], None]) -> dict:
    threads = threads or min(8, os.cpu_count() or 1)
    start = time.perf_counter()
    tmp_data = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
    tmp_index = index_path.with_name(f"{index_path.name}.tmp-{os.getpid()}")
    entries: list[dict] = []
    offset = 0
    try:
        with open(tmp_data, "wb") as out, ThreadPoolExecutor(max_workers=threads) as pool:
            bar = _progress(range(len(pairs)), progress, "build image cache")
            chunk = 2 * threads  # bounded read-ahead: at most this many decoded pairs in memory
            for first in range(0, len(pairs), chunk):
                batch = pairs[first:first + chunk]
                for (image_path, label_path), (image, label) in zip(batch, pool.map(lambda p: load_pair(*p), batch)):
                    _check_pair(image_path, image, label)
                    if not entries:
                        _check_space(data_path, image, label, len(pairs))
                    crc = zlib.crc32(np.ascontiguousarray(image))
                    out.write(np.ascontiguousarray(image).data)
                    size = image.size
                    if label is not None:
                        crc = zlib.crc32(np.ascontiguousarray(label), crc)
                        out.write(np.ascontiguousarray(label).data)
                        size += label.size
                    entries.append({"image": image_path, "label": label_path, "height": int(image.shape[0]),
                                    "width": int(image.shape[1]), "offset": offset, "crc32": crc})
                    offset += size
                if progress:
                    bar.update(len(batch))
            if progress:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
        index = {"format": CACHE_FORMAT, "source_sha256": checksum, "data_bytes": offset,
                 "built": time.strftime("%Y-%m-%d %H:%M:%S"), "entries": entries}
        tmp_index.write_text(json.dumps(index) + "\n")
        # Data first, index last: an index on disk always describes a complete data file.
        index_path.unlink(missing_ok=True)
        os.replace(tmp_data, data_path)
        os.replace(tmp_index, index_path)
    except OSError as exc:
        raise ImageCacheError(f"cannot write the image cache {data_path}: {exc}. Free disk space or pass "
                              "another --image-cache folder.") from exc
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    log(f"image cache {data_path}: {len(entries)} samples, {offset / 2**30:.2f} GiB, "
        f"built in {time.perf_counter() - start:.0f} s")
    return index


def _check_pair(image_path: str, image: np.ndarray, label: np.ndarray | None) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageCacheError(f"{image_path}: the loader returned {image.dtype} {image.shape}, the image cache "
                              "holds (H, W, 3) uint8 images.")
    if label is not None and (label.dtype != np.uint8 or label.shape != image.shape[:2]):
        raise ImageCacheError(f"{image_path}: its label is {label.dtype} {label.shape}, the image cache holds "
                              f"(H, W) uint8 labels of the image's size {image.shape[:2]}.")


def _check_space(data_path: Path, image: np.ndarray, label: np.ndarray | None, count: int) -> None:
    """Refuse early when the first entry's size times the count clearly does not fit on the disk."""
    need = (image.size + (0 if label is None else label.size)) * count
    free = shutil.disk_usage(data_path.parent).free
    if need > free:
        raise ImageCacheError(f"the image cache needs about {need / 2**30:.1f} GiB, {data_path.parent} has "
                              f"{free / 2**30:.1f} GiB free. Pass an --image-cache folder on a larger disk.")
