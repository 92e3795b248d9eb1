"""The inference front doors: OpenAI-compatible HTTP (and gRPC, through the same command)."""
