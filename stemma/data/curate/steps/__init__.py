"""The built-in curation steps, one module each; importing this package registers all of them."""

import importlib
import pkgutil

# Every module here registers its step on import (`..base.register`); a new step is one new file.
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_m.name}")
