"""The benchmark's cases and its 1-rank communicator: the home that ``bench.py`` (timing),
``_sweep.py`` (launch-configuration tuning) and ``_bench_model.py`` (the ResNet-50 step)
all import, so that none of them imports another.
"""
from __future__ import annotations

import sys
from typing import Any

SHAPES = [(64, 256, 56, 56), (4, 256, 128, 128), (64, 2048, 7, 7), (32, 64, 112, 112), (64, 1024, 14, 14),
          (2, 512, 32, 32)]
QUICK_SHAPES = [(64, 256, 56, 56), (64, 2048, 7, 7), (2, 512, 32, 32)]
DTYPES = ["float32", "float16", "bfloat16"]
LAYOUTS = ["NCHW", "NHWC"]

_COMM: dict[str, Any] = {}


def nccl_comm() -> Any:
    """One NCCL communicator of this process alone, built on first use and shared by every
    measurement (a ``SingleProcessComm`` when NCCL is not available: the kernels are still timed)."""
    if "comm" not in _COMM:
        import cusyncbn
        try:
            _COMM["comm"] = cusyncbn.NCCLComm()
        except Exception as exc:                           # no NCCL: still time the kernels
            print(f"note: NCCLComm unavailable ({exc}); timing with SingleProcessComm", file=sys.stderr)
            _COMM["comm"] = cusyncbn.SingleProcessComm()
    return _COMM["comm"]
