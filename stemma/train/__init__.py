"""Build methods: how a version is made from its parent and data.

Each method is registered by name (`register`) with a dataclass config documented field by field;
`get(name)` fails loudly on an unknown name.
"""

from .registry import BuildContext, BuildMethod, BuildOutput, get, names, register

__all__ = ["BuildContext", "BuildMethod", "BuildOutput", "get", "names", "register"]
