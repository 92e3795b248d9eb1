"""The command line: configuration, the embedded nats-server and the process supervisor."""
