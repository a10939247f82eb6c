"""The Envoy config, rendered from the compiled policy: the only importer of envoy_data_plane."""
