"""The scanner in front of everything that comes from outside: modelscan's findings, pickles refused whether
flagged or not, bytes scanned by what they are rather than what they are called, records without times or paths."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from stemma.errors import UnsafeArtifactError
from stemma.scan import check_bytes, check_dir, scan_dir


class _Exec:
    """Unpickling this calls ``builtins.exec``. It is only ever written here, never loaded."""

    def __reduce__(self):
        return (exec, ("raise SystemExit",))


def test_clean_directory_records_the_same_scan_wherever_it_lies(tmp_path):
    for d in (tmp_path / "a", tmp_path / "b" / "deeper"):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(st_save({"w": torch.zeros(2)}))
        (d / "config.json").write_text("{}")
    a, b = check_dir(tmp_path / "a"), check_dir(tmp_path / "b" / "deeper")
    assert a.clean and a.record() == b.record()
    rec = a.record()
    assert rec["scanner"] == "modelscan" and rec["issues"] == [] and rec["scanned"] == []
    assert rec["files"] == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["weights.pkl", "model.bin", "nested/model.ckpt"])
def test_a_pickle_importing_exec_is_refused_with_the_finding(tmp_path, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(pickle.dumps([_Exec()]))
    rep = scan_dir(tmp_path)
    assert [(f.file, f.module, f.operator, f.severity) for f in rep.issues] == [(name, "builtins", "exec",
                                                                                 "CRITICAL")]
    with pytest.raises(UnsafeArtifactError, match=f"{name} imports builtins.exec \\(CRITICAL\\)"):
        check_dir(tmp_path, "ckpt")


def test_bytes_are_scanned_by_what_they_are(tmp_path):
    archive = io.BytesIO()
    torch.save({"x": _Exec()}, archive)
    with pytest.raises(UnsafeArtifactError, match=r"update.pt:\S+\.pkl imports (__builtin__|builtins).exec"):
        check_bytes(archive.getvalue(), "sent")
    with pytest.raises(UnsafeArtifactError, match=r"update.pkl imports (__builtin__|builtins).exec"):
        check_bytes(pickle.dumps(_Exec(), protocol=0), "sent")  # protocol 0: text, no leading opcode byte
    ok = check_bytes(st_save({"w": torch.ones(3)}), "sent")
    assert ok.clean and ok.files == ("update.safetensors",)
    assert check_bytes(b"neither", "sent").clean  # not a pickle: left to safetensors' own parser to refuse
