"""load_rows: every source kind, and errors that name the file, the 1-based row and the problem."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftray.data import BUNDLED, DataError, detect_format, load_rows
from ftray.data import sources

COT_ROWS = [{"question": f"What is {i} + 1?", "rationale": f"{i} + 1 = {i + 1}.", "answer": str(i + 1)}
            for i in range(5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_each_file_type_loads_the_same_rows(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, COT_ROWS)
    elif suffix == "json":
        path.write_text(json.dumps(COT_ROWS))
    elif suffix == "csv":
        write_csv(path, COT_ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(COT_ROWS), path)
    ds = load_rows(str(path))
    assert ds.to_list() == COT_ROWS
    assert detect_format(ds) == "cot"


def test_json_object_holding_the_rows_and_json_lines_with_json_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": COT_ROWS}))
    write_jsonl(tmp_path / "b.json", COT_ROWS)
    assert load_rows(str(tmp_path / "a.json")).to_list() == COT_ROWS
    assert load_rows(str(tmp_path / "b.json")).to_list() == COT_ROWS


def test_csv_classification_label_is_parsed_as_int(tmp_path: Path) -> None:
    rows = [{"text": "goal!", "label": "0", "label_name": "sports"},
            {"text": "atoms", "label": "1", "label_name": "science"}]
    ds = load_rows(str(write_csv(tmp_path / "c.csv", rows)))
    assert ds["label"] == [0, 1]
    assert ds["options"] == [["sports", "science"]] * 2


def test_bundled_sources_and_max_samples() -> None:
    for name in BUNDLED:
        assert len(load_rows(f"bundled:{name}", split="test")) == (300 if name == "retrieval" else 200)
    assert len(load_rows("bundled:arithmetic", max_samples=7)) == 7
    with pytest.raises(DataError, match="no bundled dataset 'nope'"):
        load_rows("bundled:nope")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_rows("bundled:arithmetic", split="validation")


def test_directory_uses_the_split_file_when_files_are_named_for_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", COT_ROWS[:3])
    write_jsonl(tmp_path / "test.jsonl", COT_ROWS[3:])
    assert load_rows(str(tmp_path), split="test").to_list() == COT_ROWS[3:]
    with pytest.raises(DataError, match="no file for split 'validation'.*test.jsonl, train.jsonl"):
        load_rows(str(tmp_path), split="validation")


def test_directory_without_split_names_concatenates_all_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "part1.jsonl", COT_ROWS[:2])
    write_csv(tmp_path / "part2.csv", COT_ROWS[2:])
    assert load_rows(str(tmp_path), split="anything").to_list() == COT_ROWS


def test_hf_ids_go_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(sources.datasets, "load_dataset",
                        lambda src, split: calls.append((src, split)) or datasets.Dataset.from_list(COT_ROWS))
    assert len(load_rows("org/some_dataset", split="test", max_samples=2)) == 2
    assert calls == [("org/some_dataset", "test")]


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "absent.jsonl"))


# --- errors name the file, the 1-based row and the problem ---

def test_broken_json_line_names_row_3(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in COT_ROWS]
    lines[2] = '{"question": "What is 2 + 1?", "rationale": '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path} row 3: invalid JSON"):
        load_rows(str(path))


def test_row_missing_a_field(tmp_path: Path) -> None:
    rows = [dict(r) for r in COT_ROWS]
    del rows[3]["answer"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value) == (f"{path} row 4: field 'answer' is missing "
                            "(format 'cot' needs question, rationale, answer)")


def test_int_where_a_string_is_needed(tmp_path: Path) -> None:
    rows = [dict(r) for r in COT_ROWS]
    rows[1]["answer"] = 2
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path} row 2: field 'answer' must be a string, got int 2$"):
        load_rows(str(path))


def test_int_column_in_parquet_is_reported_at_row_1(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1?", "completion": 2}]), path)
    with pytest.raises(DataError, match="row 1: field 'completion' must be a string, got int 2"):
        load_rows(str(path))


def test_mixed_types_in_an_unchecked_column_name_the_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b", "meta": 1}, {"prompt": "c", "completion": "d", "meta": [1]}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match="row 2: field 'meta' is list"):
        load_rows(str(path))


def test_unknown_format_lists_the_columns(tmp_path: Path) -> None:
    # (instruction + output is Alpaca now; query + response is no format)
    path = write_jsonl(tmp_path / "x.jsonl", [{"query": "hi", "response": "hello"}])
    ds = load_rows(str(path))  # loading does not need a format; using it does
    with pytest.raises(DataError, match=r"x.jsonl: cannot tell the data format from its columns "
                                        r"\['query', 'response'\]"):
        detect_format(ds, source=str(path))


def test_ragged_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match="x.csv row 2: has 3 cells but the header has 2 columns"):
        load_rows(str(path))


def test_chat_rows_are_checked(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again?"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError, match="chat.jsonl row 2: the last message must be the assistant's reply"):
        load_rows(str(path))
    assert detect_format(load_rows(str(write_jsonl(tmp_path / "ok.jsonl", [good])))) == "chat"
