"""GPUs at the front door: offers, instances, reservations, the catalogue, preferences."""
