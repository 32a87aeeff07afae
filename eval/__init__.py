"""Labelled retrieval fixtures and the scripts that build them."""
