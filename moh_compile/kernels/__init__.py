"""Fast kernels for the project's ops. Importing this registers them with the ops' dispatch:
the CPU block-sparse and routed-head kernels always; the Triton GPU kernels when triton is installed (they
only claim CUDA tensors)."""
from moh_compile.kernels import block_sparse  # noqa: F401  (registers the sparse CPU kernel)
from moh_compile.kernels import routed_attention  # noqa: F401  (registers the routed-head CPU kernel)
from moh_compile.kernels.triton import triton_available

if triton_available():
    from moh_compile.kernels.triton import register as _triton_register

    _triton_register.register()
