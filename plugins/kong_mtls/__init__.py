"""kong-mtls: Kong Gateway OSS plugins served by Kong's Python plugin server."""

__version__ = "0.1.0"
