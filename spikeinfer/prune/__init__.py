"""Spatio-temporal pruning (DESIGN sections 7-8)."""
