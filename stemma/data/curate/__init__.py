"""Curation: an ordered list of registered steps run over a corpus in shards (`pipeline`), on local processes or Ray."""

from .base import (
           CorpusStep,
           CurateContext,
           Doc,
           DocumentStep,
           Drop,
           StepSpec,
           StepStats,
           Tag,
           get,
           names,
           parse_steps,
           register,
)

__all__ = ["CorpusStep", "CurateContext", "Doc", "DocumentStep", "Drop", "StepSpec", "StepStats", "Tag", "get", "names",
           "parse_steps", "register"]
