"""Audit events: the fixed envelope every component emits, and the sink they go through."""
