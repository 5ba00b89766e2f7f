"""Triton kernels of tritonjac, installed as `tritonjac.kernels` (only @triton.jit code lives here).

Empty until the fused forward kernels land; see DESIGN.md section 3.
"""
