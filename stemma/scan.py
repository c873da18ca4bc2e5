"""Scanning what comes in from outside before anything reads it: checkpoint directories and update files.

The scanner is modelscan (Protect AI), through its Python API, offline. It dispatches on file extensions:
pickle-based files (``.pkl``, ``.bin``, ``.pt``, ``.ckpt``, members of PyTorch zip archives, ...) are read
opcode by opcode, never unpickled, and every global they import is checked against its list of unsafe
modules and operators (``os.system``, ``builtins.exec``, ...). modelscan 0.8.8 skips a ``.bin``/``.pt`` that is
a bare pickle rather than PyTorch's format (it looks for PyTorch's magic number first), though ``torch.load``
would run it; here its pickle scanner reads those extensions too.

stemma reads safetensors and JSON only, which carry no code; modelscan has no scanner for them and lists them
as not scanned. The rule: a file the scanner flags, a file it could not read, or any pickle-based file (flagged
or not) refuses the whole input, with the scanner's finding in one line. A passing scan is recorded (scanner,
version, files, what it read, issues: none) without times or paths, so the same input gives the same record.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnsafeArtifactError

SCANNER = "modelscan"
_SEVERITY = {"CRITICAL": 4, "HIGH": 3, "MEDIUM": 2, "LOW": 1}


@dataclass(frozen=True)
class Finding:
    """One unsafe global a pickle imports, as the scanner reports it."""

    file: str
    module: str
    operator: str
    severity: str

    @property
    def line(self) -> str:
        return f"{self.file} imports {self.module}.{self.operator} ({self.severity})"


@dataclass(frozen=True)
class ScanReport:
    scanner: str
    version: str
    files: tuple[str, ...]
    """Every file offered, relative to the scanned directory, sorted."""
    scanned: tuple[str, ...]
    """Files (and archive members, ``file:member``) the scanner read; the others are formats it has no scanner for."""
    issues: tuple[Finding, ...]
    errors: tuple[str, ...]
    """Files the scanner could not read as the format their name claims."""
    pickled: tuple[str, ...]
    """Files of a pickle-based format (by the scanner's own extension lists), flagged or not."""

    @property
    def clean(self) -> bool:
        return not (self.issues or self.errors or self.pickled)

    def record(self) -> dict[str, Any]:
        """What a manifest or an update's record keeps of a passing scan (no times, no paths)."""
        return {"scanner": self.scanner, "version": self.version, "files": list(self.files),
                "scanned": list(self.scanned), "issues": [vars(i) for i in self.issues]}

    def refusal(self, what: str) -> str | None:
        """One line saying why ``what`` is refused, or None when the scan passed."""
        tool = f"{self.scanner} {self.version}"
        if self.issues:
            worst = max(self.issues, key=lambda i: _SEVERITY.get(i.severity, 0))
            more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
            return f"{what}: {tool} found {worst.line}{more}; refused, nothing stored"
        if self.pickled:
            return (f"{what}: {', '.join(self.pickled)} is pickle-based (can run code when loaded; {tool} found no "
                    "unsafe import, stemma takes safetensors only); refused, nothing stored")
        if self.errors:
            return f"{what}: {tool} could not read {self.errors[0]}; refused, nothing stored"
        return None


def _settings() -> dict[str, Any]:
    """modelscan's defaults, with its pickle scanner also reading PyTorch's extensions (bare pickles there)."""
    from modelscan.settings import DEFAULT_SETTINGS

    s = copy.deepcopy(DEFAULT_SETTINGS)
    torch_ext = s["scanners"]["modelscan.scanners.PyTorchUnsafeOpScan"]["supported_extensions"]
    pickle_scan = s["scanners"]["modelscan.scanners.PickleUnsafeOpScan"]
    pickle_scan["supported_extensions"] = sorted({*pickle_scan["supported_extensions"], *torch_ext})
    formats = s["middlewares"]["modelscan.middlewares.FormatViaExtensionMiddleware"]["formats"]
    (pickle_fmt,) = [k for k in formats if k.name == "PICKLE"]
    formats[pickle_fmt] = sorted({*formats[pickle_fmt], *torch_ext})
    return s


def _pickle_based(name: str, settings: dict[str, Any]) -> bool:
    formats = settings["middlewares"]["modelscan.middlewares.FormatViaExtensionMiddleware"]["formats"]
    exts = {e for k, v in formats.items() if k.name in ("PICKLE", "PYTORCH") for e in v}
    return any(Path(part).suffix.lower() in exts for part in name.split(":"))


def scan_dir(path: Path) -> ScanReport:
    """Scan every file under ``path`` (recursively, archives' members included)."""
    import logging

    from modelscan._version import __version__
    from modelscan.modelscan import ModelScan

    path = Path(path).resolve()
    settings = _settings()
    logging.getLogger("modelscan").setLevel(logging.CRITICAL)  # its findings come back in the report
    report = ModelScan(settings=settings).scan(path)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    scanned = sorted(set(report["summary"]["scanned"].get("scanned_files", [])))
    issues = tuple(sorted({Finding(i["source"], i["module"], i["operator"], i["severity"]) for i in report["issues"]},
                          key=lambda f: (-_SEVERITY.get(f.severity, 0), f.file, f.module, f.operator)))
    errors = tuple(sorted({f"{e.get('source', '?')} ({e.get('description', e.get('category', 'error'))})"
                           for e in report["errors"]}))
    pickled = tuple(sorted({f for f in [*files, *scanned] if _pickle_based(f, settings)}))
    return ScanReport(SCANNER, __version__, tuple(files), tuple(scanned), issues, errors, pickled)


def check_dir(path: Path, what: str | None = None) -> ScanReport:
    """Scan a directory and refuse it (`UnsafeArtifactError`) unless the scan passed."""
    rep = scan_dir(path)
    why = rep.refusal(what or str(path))
    if why:
        raise UnsafeArtifactError(why)
    return rep


def _sniffed_name(raw: bytes) -> str:
    """A file name for bytes that came without a trustworthy one, by what their first bytes are."""
    if raw[:4] == b"PK\x03\x04":
        return "update.pt"  # a zip archive: PyTorch's format (its pickles are scanned member by member)
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    if 0 < n <= len(raw) - 8 and raw[8:9] == b"{":
        return "update.safetensors"
    if raw[:1] == b"\x80" or raw[-1:] == b".":
        return "update.pkl"  # a pickle's protocol opcode, or its STOP opcode at the end
    return "update.safetensors"  # neither: safetensors' own parser refuses it with its reason


def check_bytes(raw: bytes, what: str) -> ScanReport:
    """Scan one file held in memory (an update) under a name chosen by its content; refuse it unless it passed."""
    with tempfile.TemporaryDirectory(prefix="stemma-scan-") as d:
        Path(d, _sniffed_name(raw)).write_bytes(raw)
        return check_dir(Path(d), what)
