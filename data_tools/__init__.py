"""Building and inspecting shards, corpus readers, and the built-in synthetic demo corpus."""
