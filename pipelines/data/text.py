"""Byte-level text corpora for language modelling, laid out for truncated backprop (TBPTT).

The corpus is read in the driver (it is capped by `max_bytes`, a few MB), split into train and
validation by document, and each split is joined into one byte stream. The stream is cut into
rows of `stream_len + 1` consecutive bytes (inputs = row[:-1], labels = row[1:]); row r + 1
starts where row r ends. Training cuts a batch of rows along time with `segments`, so each row
is one long stream whose memory state carries over from segment to segment.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.config import TextTask
from pipelines.data.errors import DataError
from pipelines.data.tasks.common import Batch, split_evenly

# Installed third-party code varies between machines; the default corpus is the stdlib alone.
_NOT_STDLIB = {"site-packages", "dist-packages"}


@dataclass(frozen=True)
class Corpus:
    """A split corpus: one byte stream per split, and a fingerprint of the bytes for the cache."""

    train: bytes
    validation: bytes
    fingerprint: str


def load_corpus(task: TextTask, seed: int) -> Corpus:
    """Read, cap and split the corpus; raise `DataError` for a missing, empty or unreadable one."""
    documents = [document for document in _read_documents(task) if document]
    if len(documents) < 2:
        raise DataError(
            f"the text corpus ({describe(task)}) has {len(documents)} non-empty document(s); "
            "a train/validation split by document needs at least 2: add files or raise max_bytes"
        )
    train, validation = split_documents(documents, task.validation_fraction, seed)
    corpus = Corpus(b"".join(train), b"".join(validation), _fingerprint(documents))
    for name, stream in (("train", corpus.train), ("validation", corpus.validation)):
        if len(stream) < task.stream_len + 1:
            raise DataError(
                f"the {name} split has {len(stream)} bytes, fewer than stream_len + 1 = "
                f"{task.stream_len + 1}: lower task.stream_len or add text"
            )
    return corpus


def describe(task: TextTask) -> str:
    if task.hf_path is not None:
        return f"task.hf_path={task.hf_path}"
    return f"task.files={task.files!r}" if task.files else "the Python standard library"


def split_documents(
    documents: list[bytes], validation_fraction: float, seed: int
) -> tuple[list[bytes], list[bytes]]:
    """Whole documents go to one side, so no text is shared; order is kept within each side."""
    count = len(documents)
    num_validation = min(count - 1, max(1, round(validation_fraction * count)))
    chosen = set(np.random.default_rng(seed).permutation(count)[:num_validation].tolist())
    train = [doc for index, doc in enumerate(documents) if index not in chosen]
    validation = [doc for index, doc in enumerate(documents) if index in chosen]
    return train, validation


def _read_documents(task: TextTask) -> list[bytes]:
    if task.hf_path is not None:
        return _read_hf(task)
    paths = _glob(task.files) if task.files else stdlib_files()
    return _read_files(paths, task.max_bytes)


def stdlib_files() -> list[Path]:
    """The standard library's `*.py` files in sorted order: the same corpus on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (path for path in root.rglob("*.py") if not _NOT_STDLIB & set(path.parts))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _glob(pattern: str) -> list[Path]:
    paths = sorted(Path(path) for path in glob.glob(pattern, recursive=True))
    if not paths:
        raise DataError(
            f"task.files={pattern!r} matched no files: fix the glob (use ** for subfolders) or "
            "leave task.files unset for the standard-library corpus"
        )
    return paths


def _read_files(paths: list[Path], max_bytes: int) -> list[bytes]:
    """Whole files in order until `max_bytes`; the last one is cut to fit."""
    documents: list[bytes] = []
    left = max_bytes
    for path in paths:
        if left <= 0:
            break
        documents.append(_read_file(path, left))
        left -= len(documents[-1])
    return documents


def _read_file(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(limit)
    except OSError as error:
        raise DataError(
            f"cannot read corpus file {path}: {error.strerror or error}; fix its permissions or "
            "narrow task.files to exclude it"
        ) from error


def _read_hf(task: TextTask) -> list[bytes]:
    dataset = _load_hf(task)
    documents: list[bytes] = []
    left = task.max_bytes
    for batch in dataset.select_columns([task.text_column]).iter(batch_size=1024):
        for text in batch[task.text_column]:
            if left <= 0:
                return documents
            documents.append(str(text).encode("utf-8")[:left])
            left -= len(documents[-1])
    return documents


def _load_hf(task: TextTask):  # -> datasets.Dataset
    import datasets

    path = task.hf_path
    if path is None or not path.exists():
        raise DataError(
            f"task.hf_path={path} does not exist: save a data set there with "
            "`Dataset.save_to_disk(path)` or fix the path"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(
            f"task.hf_path={path} is not a saved `datasets` data set: {error}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if task.hf_split not in loaded:
            raise DataError(f"task.hf_split={task.hf_split!r} not in {list(loaded)}: pick one")
        loaded = loaded[task.hf_split]
    if task.text_column not in loaded.column_names:
        raise DataError(
            f"task.text_column={task.text_column!r} not in {loaded.column_names}: "
            "name the column that holds the text"
        )
    return loaded


def _fingerprint(documents: list[bytes]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(len(document).to_bytes(8, "little"))
        digest.update(document)
    return digest.hexdigest()


def block_slices(stream: bytes, stream_len: int, blocks: int) -> list[tuple[int, bytes]]:
    """Cut a stream into at most `blocks` pieces at row boundaries: (first row, piece bytes).

    Piece b holds its rows' bytes plus one more, so no target is lost between pieces.
    """
    rows = (len(stream) - 1) // stream_len
    pieces = []
    start = 0
    for count in split_evenly(rows, min(blocks, rows)):
        pieces.append((start, stream[start * stream_len : (start + count) * stream_len + 1]))
        start += count
    return pieces


def stream_rows(piece: bytes, stream_len: int, first_row: int = 0) -> Batch:
    """Rows of `stream_len + 1` consecutive bytes -> inputs/labels `[R, stream_len]` int64."""
    tokens = np.frombuffer(piece, dtype=np.uint8).astype(np.int64)
    rows = (tokens.size - 1) // stream_len
    used = tokens[: rows * stream_len + 1]
    return {
        "inputs": used[:-1].reshape(rows, stream_len),
        "labels": used[1:].reshape(rows, stream_len),
        "position": (first_row + np.arange(rows, dtype=np.int64)) * stream_len,
    }
