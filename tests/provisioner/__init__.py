"""The provisioner worker: registry, lifecycle, reservations, reconciler, metering."""
