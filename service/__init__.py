"""nsqjobs runtime: wire format, configuration, gateway, consumer and CLI."""

__version__ = "0.1.0"
