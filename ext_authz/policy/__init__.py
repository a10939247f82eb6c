"""The policy, pure: config, networks, routing, the compiled Policy and its decisions."""
