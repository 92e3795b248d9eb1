"""The proxy worker: inference forwarding to instances with load balancing.

Today it answers pings; the inference commands join it on the same consumer.
"""
