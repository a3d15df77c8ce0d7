"""Tiled NumPy backend."""
