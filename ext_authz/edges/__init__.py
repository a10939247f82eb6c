"""The gRPC edges that read the compiled policy: ext_authz, ext_proc and xDS."""
