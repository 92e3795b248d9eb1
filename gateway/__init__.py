"""The front door: gRPC and HTTP in one process, authenticate, validate, publish, relay.

Holds no state another replica would need: everything it knows comes from the bus.
"""
