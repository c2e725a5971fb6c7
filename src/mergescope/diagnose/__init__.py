"""Diagnose a set of models before merging them (placeholder until diagnose() lands)."""
