"""Tokens: the record, its sealing, the stores that keep it and the manager that refreshes it."""
