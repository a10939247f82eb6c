"""MCP wire knowledge, pure: the JSON-RPC body reader, replies and answer rewriting."""
