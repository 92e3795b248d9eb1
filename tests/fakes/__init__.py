"""Local HTTP fakes shaped exactly like outside APIs that cannot be reached from tests."""
