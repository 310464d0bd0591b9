"""quota-sidecar: connect your users' Quota wallets to any web app."""

__version__ = "0.1.0"
