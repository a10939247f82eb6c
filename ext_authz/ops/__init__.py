"""Operating the sidecar: the admin listener, metrics and the decision log."""
