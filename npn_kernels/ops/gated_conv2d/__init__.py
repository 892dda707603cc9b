"""Gated conv2d layer (DESIGN 2, 4.2, 4.3): reference.py (oracle), function.py (op + autograd)."""
