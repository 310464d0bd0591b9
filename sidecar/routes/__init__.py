"""HTTP routes the sidecar answers itself."""
