"""Kernel benchmarks of npn_kernels (run `npn bench` or `python -m bench`); see NOTES.md."""
