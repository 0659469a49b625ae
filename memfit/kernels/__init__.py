"""Triton kernels, each beside its pure-torch reference (none yet: the few-bit kernels land here)."""
