"""stemma: the family tree of language models.

One master model, children specialised by language, domain, sub-domain and device; every version
content-addressed and aware of where it came from.
"""

__version__ = "0.1.0"
