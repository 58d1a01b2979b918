"""Triton, CUDA tensors (CPU tensors through Triton's interpreter, for tests): the search and attention kernels."""
