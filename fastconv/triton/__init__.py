"""fastconv's Triton kernels and their launchers."""
from ._interpreter_compat import install as _install_interpreter_compat

_install_interpreter_compat()  # triton 3.6's interpreter under NumPy >= 2.4 (see _interpreter_compat)
