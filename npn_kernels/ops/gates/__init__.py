"""Gate sampling and the L0 penalty (DESIGN 2.1, 2.2): reference.py (PyTorch oracle), triton.py, function.py (ops)."""
