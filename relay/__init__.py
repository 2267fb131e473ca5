"""relay: a self-hosted SMTP submission relay."""
__version__ = "0.1.0"
