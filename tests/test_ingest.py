import json

import pytest

from stemma.data.ingest import IngestOptions, build_dataset, read_docs
from stemma.errors import DataError


def _jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_text_dir_and_jsonl_with_dedup_and_datasheet(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("alpha document\n\nwith two paragraphs")
    (d / "b.md").write_text("beta document")
    (d / "dup.txt").write_text("beta document")  # exact duplicate of b.md
    (d / "image.png").write_bytes(b"\x89PNG\x00\xff")
    j = _jsonl(tmp_path / "x.jsonl", [{"text": f"doc {i} " * 20, "license": "MIT", "title": str(i)} for i in range(40)])
    built = build_dataset([d, j], IngestOptions(name="t", license="CC0-1.0", language="en"))
    c = built.datasheet["counts"]
    assert c["documents_read"] == 43
    assert built.datasheet["curation"][0]["kinds"] == {"exact_duplicate": 1}
    assert c["documents"] == 42 == c["train_documents"] + c["test_documents"]
    assert c["test_documents"] >= 1
    assert built.datasheet["licenses"] == {"CC0-1.0": 2, "MIT": 40}
    assert built.datasheet["skipped_files"] == ["image.png"]
    train = read_docs(built.train)
    assert all("source" in doc for doc in train)


def test_split_is_deterministic_and_stable_under_additions(tmp_path):
    docs = [{"text": f"document number {i} about things"} for i in range(200)]
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    a = build_dataset([_jsonl(tmp_path / "a" / "x.jsonl", docs)], IngestOptions(name="t"))
    b = build_dataset([_jsonl(tmp_path / "b" / "x.jsonl", docs + [{"text": "a new one"}])], IngestOptions(name="t"))
    a2 = build_dataset([_jsonl(tmp_path / "c" / "x.jsonl", docs)], IngestOptions(name="t"))
    assert a.manifest["test"] == a2.manifest["test"]
    test_a = {d["text"] for d in read_docs(a.test)}
    test_b = {d["text"] for d in read_docs(b.test)}
    assert test_a <= test_b
    assert 0 < len(test_a) < 30


def test_long_documents_are_chunked(tmp_path):
    text = "\n\n".join(f"paragraph {i} " + "x" * 80 for i in range(100))
    f = tmp_path / "long.txt"
    f.write_text(text)
    built = build_dataset([f], IngestOptions(name="t", max_doc_chars=1000))
    docs = read_docs(built.train) + read_docs(built.test)
    assert len(docs) > 5
    assert max(len(d["text"]) for d in docs) <= 1000


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: (p / "empty.txt").write_text("   \n\n") and p / "empty.txt", "empty"),
        (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n') and p / "bad.jsonl",
         "bad.jsonl: line 2: not valid JSON"),
        (lambda p: (p / "nt.jsonl").write_text('{"body": "x"}\n') and p / "nt.jsonl", "'text' field"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and p / "bin.txt", "binary"),
        (lambda p: (p / "l1.txt").write_bytes(b"caf\xe9\n") and p / "l1.txt", "not UTF-8"),
    ],
)
def test_bad_input_is_a_clear_error_when_strict(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        build_dataset([path], IngestOptions(name="t", strict=True))


def test_dataset_name_must_be_safe(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x\n\ny")
    with pytest.raises(DataError, match="invalid dataset name"):
        build_dataset([f], IngestOptions(name="../evil"))


def test_ingest_is_idempotent_and_versions_by_name(ws, tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"text": f"t {i}"} for i in range(10)])
    row, new = ws.ingest([f], IngestOptions(name="corpus"))
    again, new2 = ws.ingest([f], IngestOptions(name="corpus"))
    assert new and not new2 and row.id == again.id and row.seq == 1
    g = _jsonl(tmp_path / "b.jsonl", [{"text": f"t {i}"} for i in range(11)])
    row2, _ = ws.ingest([g], IngestOptions(name="corpus"))
    assert row2.seq == 2 and row2.id != row.id
    assert ws.resolve_dataset("corpus").id == row2.id
    assert ws.resolve_dataset("corpus@1").id == row.id
    assert ws.resolve_dataset(row.id[:10]).id == row.id
