"""numba, CPU tensors: the compiled search and attention (every ``@njit`` kernel in ``kernels``)."""
