"""Metrics computed on versions and stored per version (memoised by version, dataset and split)."""
