"""writewatch: client library and CLI for writewatchd."""

__version__ = "0.1.0"

__all__ = ["__version__"]
