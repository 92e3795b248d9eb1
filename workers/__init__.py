"""Worker kinds: each consumes its commands from its own durable consumer, any number of copies.

A worker kind never imports another; what they share lives in `workers.common`.
"""
