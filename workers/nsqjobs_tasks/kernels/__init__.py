"""Pure compute kernels: they import NumPy, Numba or Cython and nothing of nsqjobs."""
