"""Patches that put dit_kernels ops into other libraries' models (optional dependencies, imported on use)."""
