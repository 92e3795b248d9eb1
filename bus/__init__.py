"""Bus plumbing shared by the gateway and the workers: connection, topology, commands, replies.

Built on nats-py directly where the path is hot; it speaks only `schemas` types to its callers.
"""
