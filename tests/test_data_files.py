"""Local .txt/.jsonl/.parquet files: documents per format, defined behaviour for bad input, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_testing import data_config

from hymba_jax.data import open_documents
from hymba_jax.data.local_files import expand_patterns, file_documents


def test_txt_blocks_are_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph,\nsecond line.\n\n\n  \nSecond paragraph.\n\nThird\n")
    assert list(file_documents(path, "text")) == ["First paragraph,\nsecond line.", "Second paragraph.", "Third"]


def test_empty_file_warns_and_gives_nothing(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n \n")
    with pytest.warns(UserWarning, match="empty.txt holds no documents"):
        assert list(file_documents(path, "text")) == []


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ok\n".encode("latin-1") + "na\u00efve\n".encode("utf-8"))
    with pytest.warns(UserWarning, match=r"latin1.txt: 1 line\(s\) hold bytes that are not UTF-8"):
        assert list(file_documents(path, "text")) == ["caf\ufffd ok\nna\u00efve"]


def test_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": text, "id": i}) for i, text in enumerate(["one", " ", "two"])) + "\n\n")
    assert list(file_documents(path, "body")) == ["one", "two"]
    with pytest.raises(ValueError, match=r"docs.jsonl:1: expected a JSON object with a string field 'text'"):
        list(file_documents(path, "text"))
    path.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not a JSON object"):
        list(file_documents(path, "text"))


def test_parquet_column_and_errors(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta", ""], "n": [1, 2, 3, 4]}), path)
    assert list(file_documents(path, "content")) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        list(file_documents(path, "text"))
    with pytest.raises(ValueError, match="column 'n' holds int64, not strings"):
        list(file_documents(path, "n"))


def test_missing_and_unsupported_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here/\\*.txt"):
        expand_patterns([str(tmp_path / "nothing_here/*.txt")])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="table.csv: unsupported file type '.csv'"):
        expand_patterns([str(tmp_path / "table.csv")])


def test_files_source_prepares_all_formats_once(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n\n".join(f"Text paragraph {i}." for i in range(50)))
    (tmp_path / "data" / "empty.txt").write_text("")
    (tmp_path / "data" / "b.jsonl").write_text("".join(json.dumps({"text": f"Json line {i}."}) + "\n" for i in range(50)))
    pq.write_table(pa.table({"text": [f"Parquet row {i}." for i in range(50)]}), tmp_path / "data" / "c.parquet")
    config = data_config(tmp_path / "cache", source="files", files=[str(tmp_path / "data" / "*")], val_fraction=0.1)
    with pytest.warns(UserWarning, match="empty.txt holds no documents"):
        train = list(open_documents(config, "train"))
    validation = list(open_documents(config, "validation"))  # Prepared already: no second warning.
    assert sorted(train + validation) == sorted(
        [f"Text paragraph {i}." for i in range(50)]
        + [f"Json line {i}." for i in range(50)]
        + [f"Parquet row {i}." for i in range(50)]
    )
    assert 0 < len(validation) < 40
    assert len(list((tmp_path / "cache" / "corpora").iterdir())) == 1


def test_failed_preparation_leaves_no_corpus(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    config = data_config(tmp_path / "cache", source="files", files=[str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        open_documents(config, "train")
    assert not any((tmp_path / "cache" / "corpora").iterdir())
