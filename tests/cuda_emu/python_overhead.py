"""Not a test: the Python-side cost of one layer call on the GPU code path.

Runs the real ``CupyBackend`` launch code (through ``EmuBackend``) with every kernel
launch, allocation and pointer query replaced by a no-op, so what is timed is the
layer's and the backend's own Python: validation, views, the cached launch plans. CuPy's
launch cost (a few microseconds per kernel, 2 per pass) and NCCL's come on top on a GPU;
``python -m cusyncbn.bench`` measures the total.

    python tests/cuda_emu/python_overhead.py
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_emu  # noqa: E402

import cusyncbn  # noqa: E402
from cusyncbn import _backend  # noqa: E402


def main(calls: int = 20000) -> None:
    backend = cuda_emu.EmuBackend(sms=132)
    backend._kernel = lambda dtype_name, key, loads: (lambda grid, block, args, shared_mem=0: None)
    backend._address = lambda a: 0
    backend.empty = lambda shape, dtype: np.empty(shape, dtype)
    _backend._backends["cpu"] = backend
    bn = cusyncbn.SyncBatchNorm(256)
    x = np.ones((2, 256, 4, 4), np.float32)
    dy = np.ones_like(x)

    def per_call(fn):
        for _ in range(200):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6

    def train_step():
        bn(x)
        bn.backward(dy)

    def forward_no_grad():
        with cusyncbn.no_grad():
            bn(x)

    both = per_call(train_step)
    forward = per_call(forward_no_grad)
    bn.eval()
    evaluation = per_call(forward_no_grad)
    print(f"no-op launches: training forward+backward {both:.1f} us, "
          f"forward (no_grad) {forward:.1f} us, eval forward {evaluation:.1f} us")


if __name__ == "__main__":
    main()
