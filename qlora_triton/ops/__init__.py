"""Triton kernels and their launchers, one module per op family.

Each launcher checks its inputs, allocates outputs, builds the grid and
launches; it assumes the caller's dispatch already chose the Triton backend
(:mod:`qlora_triton.backend`)."""
