"""WKV operators (DESIGN §5). Provisional: every backend runs the step-by-step reference
until the chunked torch backend (and the Triton backend) land."""

from kernels.reference import wkv6_reference as wkv6
from kernels.reference import wkv7_reference as wkv7

__all__ = ["wkv7", "wkv6"]
