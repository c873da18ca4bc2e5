"""Build methods: how a version is made from its parent and data.

Each method is registered by name (`register`) with a dataclass config documented field by field;
`stemma.methods.get(name)` fails loudly on an unknown name.
"""

from .registry import BuildContext, BuildMethod, BuildOutput, register

__all__ = ["BuildContext", "BuildMethod", "BuildOutput", "register"]
