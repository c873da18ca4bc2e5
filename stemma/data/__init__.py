"""Corpora in, immutable datasets out (ingest; curation steps come as registered filters)."""
