"""Skip markers of the tests of the Triton kernels, in one place: whether triton imports, and whether a CUDA GPU is
there to run the kernels natively (the CPU runs them only under TRITON_INTERPRET=1, in a subprocess)."""
import pytest
import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable on this machine")
needs_cuda = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
