"""stemma: the family tree of language models.

One master model, children specialised by language, domain, sub-domain and device; every version
content-addressed and aware of where it came from.
"""

import os as _os

# stemma never fetches weights or data from a hub at run time: everything it loads is local and
# content-addressed. Setting these before transformers is imported makes that a guarantee, and keeps
# library progress bars from interleaving with stemma's own.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
