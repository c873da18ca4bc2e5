"""The catalogue of build methods: importing it registers every built-in method (`stemma.train.registry`).

The registry itself imports no method, so a method module can import the registry without a cycle.
"""

from .compress import lowrank, prune, quantize  # noqa: F401 - each module registers its method
from .train import distill, dpo, finetune, importer, lora, pretrain, sft  # noqa: F401
from .train.registry import get, names

__all__ = ["get", "names"]
