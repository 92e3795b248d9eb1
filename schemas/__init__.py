"""The bus contract: every command, reply and event, subject names, topology and error codes.

Pure data. This package imports nothing else of the project, so any process (or any other
language reading the JSON) can speak to the bus from it alone.
"""

SCHEMA_VERSION = 1
"""Bumped when a message changes incompatibly; every envelope carries the version it was made at."""
