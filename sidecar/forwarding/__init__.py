"""Forwarding: requests relayed to Quota (/v1) and to the host app (everything else)."""
