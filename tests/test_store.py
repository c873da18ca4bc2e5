import pytest

from stemma.errors import StoreError
from stemma.store import BlobStore, atomic_write_bytes, canonical_json, sha256_bytes


def test_put_get_roundtrip_and_dedup(tmp_path):
    s = BlobStore(tmp_path)
    d1 = s.put_bytes(b"hello")
    d2 = s.put_bytes(b"hello")
    assert d1 == d2 == sha256_bytes(b"hello")
    assert s.get_bytes(d1) == b"hello"
    assert list(s.iter_digests()) == [d1]


def test_put_file_matches_put_bytes(tmp_path):
    s = BlobStore(tmp_path / "store")
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x00" * 3_000_000)
    assert s.put_file(f) == sha256_bytes(f.read_bytes())
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_corrupt_blob_is_detected_on_read_and_by_fsck(tmp_path):
    s = BlobStore(tmp_path)
    good = s.put_bytes(b"good")
    bad = s.put_bytes(b"bad")
    s.path(bad).write_bytes(b"tampered")
    with pytest.raises(StoreError, match="corrupt"):
        s.get_bytes(bad)
    missing = sha256_bytes(b"never written")
    report = s.fsck({good, bad, missing})
    assert report.corrupt == [bad]
    assert report.missing == [missing]
    assert report.orphans == []
    assert not report.clean
    assert s.fsck({bad}).orphans == [good]


def test_bad_digest_is_refused(tmp_path):
    with pytest.raises(StoreError):
        BlobStore(tmp_path).path("../../etc/passwd")


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f"
    atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]
