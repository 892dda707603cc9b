"""The noise stream (DESIGN 4.1): reference.py (PyTorch oracle), triton.py, function.py (op)."""
