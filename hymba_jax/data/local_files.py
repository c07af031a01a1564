"""The user's own text files (.txt, .jsonl, .parquet), prepared once into an ArrayRecord corpus.

Documents per format:
* `.txt`: each block of lines separated by one or more blank lines is a document (a paragraph,
  a poem stanza, a speech), stripped of surrounding whitespace; so a single large file still yields
  many documents for the train/validation split.
* `.jsonl`: each non-blank line is a JSON object whose `text_key` field (a string) is a document.
* `.parquet`: each non-null value of the `text_key` column (strings) is a document.

Defined behaviours: bytes that are not UTF-8 are replaced by U+FFFD and a warning names the file and
the number of affected lines; documents that are empty or only whitespace are dropped; a file with no
documents gives a warning and is skipped; a glob matching nothing, a missing file, an unsupported
suffix, a malformed JSON line or a missing field/column raise an error naming the file (and line).
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hymba_jax.data import records

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_patterns(patterns: Sequence[str]) -> list[Path]:
    """The sorted, de-duplicated files named by `patterns` (paths or globs, `~` expanded)."""
    paths: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(str(Path(pattern).expanduser()), recursive=True)
        if not matches:
            raise FileNotFoundError(f"data.files entry {pattern!r} matches no file: check the path or glob")
        paths.update(Path(match).resolve() for match in matches if not Path(match).is_dir())
    for path in paths:
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; data.files takes {SUFFIXES}")
    return sorted(paths)


def file_documents(path: Path, text_key: str) -> Iterator[str]:
    """The non-blank documents of one file, read according to its suffix (see the module docstring)."""
    readers = {".txt": _text_blocks, ".jsonl": _jsonl_texts, ".parquet": _parquet_texts}
    count = 0
    for text in readers[path.suffix](path, text_key):
        if text.strip():
            count += 1
            yield text
    if count == 0:
        warnings.warn(f"{path} holds no documents; skipped", stacklevel=2)


def prepare_files(patterns: Sequence[str], text_key: str, cache_dir: Path, val_fraction: float) -> Path:
    """The prepared-corpus directory of the files named by `patterns`, built on first use.

    The cache key covers each file's absolute path, size and modification time, so editing a file
    prepares a new corpus.
    """
    paths = expand_patterns(patterns)
    key = records.fingerprint(
        [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in paths], text_key, val_fraction
    )

    def documents() -> Iterator[str]:
        for path in paths:
            yield from file_documents(path, text_key)

    return records.ensure_prepared(cache_dir / "corpora" / f"files-{key}", documents, val_fraction)


def decoded_lines(path: Path) -> Iterator[str]:
    """The lines of `path` (with their line ends) as text; undecodable bytes become U+FFFD, with a warning."""
    damaged = 0
    with path.open("rb") as file:
        for line in file:
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                damaged += 1
                yield line.decode("utf-8", errors="replace")
    if damaged:
        warnings.warn(
            f"{path}: {damaged} line(s) hold bytes that are not UTF-8; they were replaced by U+FFFD",
            stacklevel=3,
        )


def _text_blocks(path: Path, text_key: str) -> Iterator[str]:
    del text_key  # Plain text has no fields.
    block: list[str] = []
    for line in decoded_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip()
            block = []
    if block:
        yield "".join(block).strip()


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    for line_number, line in enumerate(decoded_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not a JSON object ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ValueError(
                f"{path}:{line_number}: expected a JSON object with a string field {text_key!r} "
                "(set data.text_key to the field that holds the text)"
            )
        yield record[text_key]


def _parquet_texts(path: Path, text_key: str) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {schema.names}); set data.text_key")
    column_type = schema.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {text_key!r} holds {column_type}, not strings")
    for batch in parquet.iter_batches(columns=[text_key]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)
