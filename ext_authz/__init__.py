"""mcp-ext-authz: an Envoy ext_authz (gRPC v3) sidecar for MCP servers."""

__version__ = "0.1.0"
