"""The HTTP filters of the listener, one module each, with their per-route configs."""
