"""The drop-in browser widget the sidecar serves at ``/auth/quota/widget.js``."""
