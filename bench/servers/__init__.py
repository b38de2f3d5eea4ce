"""Servers the harness starts besides ours: transport-limit echo servers and the peers' entry points."""
