"""The release verbs: release (signed directory with model card and ML-BOM) and verify."""

from __future__ import annotations
