"""The HTTP/1.1 layer under every daemon: connections, problem+json errors, access logs."""
