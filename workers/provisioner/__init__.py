"""The provisioner worker: GPU offers, instances and reservations.

Today it answers pings; the provisioning commands join it on the same consumer.
"""
