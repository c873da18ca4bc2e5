"""The web dashboard of the tree: server-rendered pages over the registry (`stemma serve` at ``/``, `stemma ui`)."""
