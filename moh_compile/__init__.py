"""moh-compile: turn a trained transformer into a cheaper one without starting over."""
from moh_compile import ops  # noqa: F401  (registers the custom ops)

__version__ = "0.1.0"
