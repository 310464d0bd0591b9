"""The demo: a stand-in host app that shows what any web app adds to use the sidecar."""
