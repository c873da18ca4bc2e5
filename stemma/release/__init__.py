"""Signed releases: the model's files, a model card, a CycloneDX ML-BOM and an OpenSSF model signature.

facts.py gathers what a release says about its version once; card.py writes the Hugging Face model card, bom.py the
ML-BOM, signing.py signs and checks the directory, make.py refuses or writes a release, verify.py checks one.
"""

from .make import FORMATS, Released, release
from .verify import Verified, verify

__all__ = ["FORMATS", "Released", "Verified", "release", "verify"]
