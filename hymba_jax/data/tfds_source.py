"""Any TFDS text dataset, read as a random-access ArrayRecord data source (no TensorFlow needed).

The dataset must be prepared in the ArrayRecord format, once:
`tfds build NAME --file_format=array_record --data_dir=DIR` (or `data.tfds_download=True` lets the
first run prepare it). Text features arrive as bytes (or str); bytes that are not UTF-8 are replaced
by U+FFFD.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import tensorflow_datasets as tfds


def open_tfds_texts(
    name: str, split: str, *, data_dir: str, text_key: str, download: bool
) -> grain.MapDataset[str]:
    """The texts of `split` of TFDS dataset `name`, as a random-access dataset of strings.

    Raises ValueError for an unknown dataset, split or text feature and FileNotFoundError for a
    dataset that is not prepared as ArrayRecord in `data_dir` ('' = the TFDS default directory).
    """
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir or None,
            download=download,
            builder_kwargs={"file_format": "array_record"},
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"data.tfds_name={name!r} is not a TFDS dataset; see `tfds.list_builders()` for names"
        ) from error
    except (KeyError, NotImplementedError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} has no split {split!r} prepared as ArrayRecord in "
            f"{data_dir or 'the TFDS default data_dir'}; prepare it with `tfds build {name} "
            f"--file_format=array_record --data_dir=DIR` or set data.tfds_download=True ({error})"
        ) from error
    if len(source) and text_key not in source[0]:
        raise ValueError(
            f"TFDS dataset {name!r} has no feature data.text_key={text_key!r} (features: {sorted(source[0])})"
        )
    return grain.MapDataset.source(source).map(functools.partial(_text_of, text_key=text_key))


def _text_of(example: dict[str, Any], text_key: str) -> str:
    text = example[text_key]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
