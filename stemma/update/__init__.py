"""Continuous updates along the tree: signed updates from contributors, robust aggregation behind a gate,
new parent versions that mark their descendants stale, rebased adapter children, offers to siblings."""
