"""The Python-side cost of a layer call on the GPU code path, measurable without a GPU.

The measure of host work is :func:`ledger`: the real GPU code path (the layer, the
functional core, ``CupyBackend``, the flag slots, NCCL's call) run against a recording
stand-in for CuPy (``cusyncbn._recording``), which counts per pass what costs host time on
a GPU machine: launches (and the arguments wrapped per launch), NCCL calls, allocations,
views, device-to-host copies, events, device switches, stream lookups and cusyncbn's
Python frames. ``python -m cusyncbn._hostcost`` prints it, with a host time predicted from
unit costs profiled on the H200; CI holds it under a budget (``BUDGET``), so that host work
added to the per-call path shows up as a failing test rather than as a slower GPU benchmark.
(The test suite's ``tests/stub_backend.py`` runs the same host code with no-op kernels.)
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from . import _flags, _planned
from ._backend import swap_backend

SHAPE = (2, 256, 4, 4)           # tiny: host-bound, as the benchmark's host measurement


# Host time per unit of work, profiled on the H200 on 2026-11-29 at a77b422 (docs/PERFORMANCE.md,
# upper bounds under cProfile), in microseconds. ``launch`` is a RawKernel.__call__ launch
# without its arguments (each argument wrapper adds ``argument``); a pre-packed driver launch
# is counted at ``launch`` alone, which overstates it. ``event`` is an estimate (not profiled).
UNIT_US = {"launch": 6.5, "argument": 1.05, "allocation": 11.0, "view": 4.0, "device_switch": 1.4, "nccl": 3.0,
           "copy": 22.0, "event": 3.0, "frame": 1.2}
LEDGER_FIELDS = ("launches", "nccl", "allocations", "views", "copies", "events", "device_switches",
                 "stream_lookups", "frames")
#: The budget CI holds (tests/test_host_cost.py): per training pass, the mean of a forward and a backward.
BUDGET = {"launches": 2, "nccl": 1, "allocations": 1, "views": 0, "copies": 0, "events": 0, "device_switches": 1,
          "stream_lookups": 1, "frames": 15}


class _RecordedNccl:
    """A two-rank communicator over the stand-in's NCCL (NCCLComm's calls, without MPI): the
    payload is handed to ``allReduce`` exactly as ``NCCLComm`` hands it."""

    rank, size = 0, 2

    def __init__(self) -> None:
        from cupy.cuda import nccl
        self._nccl = nccl
        self._comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)

    def allreduce(self, buf: Any) -> None:
        import cupy
        stream = cupy.cuda.get_current_stream(0).ptr
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64, self._nccl.NCCL_SUM,
                             stream)

    def prepare_allreduce(self, buf: Any, stream: int) -> Any:
        return partial(self._comm.allReduce, buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64,
                       self._nccl.NCCL_SUM, stream)


def ledger(shape: tuple = SHAPE, warm: int = 3) -> dict[str, dict[str, int]]:
    """The host work of one pass of the public layer on the GPU code path: the real
    ``CupyBackend``, functional core and layer against the recording stand-in for CuPy
    (``cusyncbn._recording``), after ``warm`` training steps.

    Also the fused epilogue (ReLU after a residual add) through the functional core, called
    as an adapter calls it (parameter gradients into given arrays, dresidual into a given
    array: "fused backward"; or into a new one: "fused backward, new dresidual").

    Returns:
        ``{"forward": {...}, "backward": {...}, "eval": {...}, "training pass": {...},
        "fused forward": {...}, "fused backward": {...}, "fused backward, new dresidual": {...},
        "fused training pass": {...}}``: per pass the ledger's counters (see
        ``_recording.Ledger``) and ``frames`` (cusyncbn Python frames); a "training pass" is
        the mean of its forward and backward, rounded up.
    """
    from . import _recording
    from ._layer import SyncBatchNorm
    from ._grad_mode import no_grad
    from .functional import sync_batch_norm, sync_batch_norm_backward
    with _recording.installed() as record:
        previous = swap_backend("gpu:0", None)
        try:
            import cupy
            comm = _RecordedNccl()
            train = SyncBatchNorm(shape[1], device="gpu:0", comm=comm)
            evaluation = SyncBatchNorm(shape[1], device="gpu:0", comm=comm).eval()
            x = cupy.zeros(shape, np.float32)
            dy = cupy.zeros(shape, np.float32)
            c = shape[1]
            params = [cupy.zeros(c, np.float32), cupy.ones(c, np.float32), cupy.ones(c, np.float32),
                      cupy.zeros(c, np.float32)]                     # running mean, var, weight, bias
            grads = {"weight_grad_out": cupy.zeros(c, np.float32), "bias_grad_out": cupy.zeros(c, np.float32)}
            residual, dresidual = cupy.zeros(shape, np.float32), cupy.zeros(shape, np.float32)
            out: dict[str, dict[str, int]] = {}
            held: list = []

            def forward() -> None:
                held.append(train(x))

            def backward() -> None:
                train.backward(dy)

            def eval_forward() -> None:
                with no_grad():
                    evaluation(x)

            def fused_forward() -> None:
                held.append(sync_batch_norm(x, *params, device="gpu:0", comm=comm, activation="relu",
                                            residual=residual)[1])

            def fused_backward() -> None:
                sync_batch_norm_backward(held.pop(), dy, residual_grad_out=dresidual, **grads)

            def fused_backward_new() -> None:
                sync_batch_norm_backward(held.pop(), dy, **grads)
            for _ in range(warm):
                train.backward(train(x))
                with no_grad():
                    evaluation(x)
                for step in (fused_forward, fused_backward, fused_forward, fused_backward_new):
                    step()
            for name, fn in (("forward", forward), ("backward", backward), ("eval", eval_forward),
                             ("fused forward", fused_forward), ("fused backward", fused_backward),
                             ("", fused_forward), ("fused backward, new dresidual", fused_backward_new)):
                record.reset()
                frames = _recording.count_frames(fn)
                counts = record.snapshot()
                counts["frames"] = frames
                if name:
                    out[name] = counts
        finally:
            # Leave nothing of the stand-in behind: its report slots (never written: its
            # kernels do not run) and its plans.
            _flags.flush()
            _planned.clear()
            swap_backend("gpu:0", previous)
    for prefix in ("", "fused "):
        fwd, bwd = out[prefix + "forward"], out[prefix + "backward"]
        out[prefix + "training pass"] = {k: -(-(fwd[k] + bwd[k]) // 2) for k in fwd}
    return out


def predicted_us(counts: dict[str, int]) -> float:
    """Host time of a pass with ``counts`` from the H200 unit costs (``UNIT_US``), in us."""
    return (counts["launches"] * UNIT_US["launch"] + counts.get("launch_args", 0) * UNIT_US["argument"]
            + counts["allocations"] * UNIT_US["allocation"] + counts["views"] * UNIT_US["view"]
            + counts["device_switches"] * UNIT_US["device_switch"] + counts["nccl"] * UNIT_US["nccl"]
            + counts["copies"] * UNIT_US["copy"] + counts["events"] * UNIT_US["event"]
            + counts["frames"] * UNIT_US["frame"])


def ledger_line(counts: dict[str, int], what: str = "training pass") -> str:
    """The ledger's closing line (its format is fixed: CI and the issue read it)."""
    return f"ledger per {what}: " + ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in LEDGER_FIELDS)


def main() -> None:
    result = ledger()
    for name in ("forward", "backward", "eval", "fused forward", "fused backward", "fused backward, new dresidual"):
        counts = result[name]
        print(f"{name:9s}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"; predicted host time {predicted_us(counts):.1f} us (H200 unit costs)")
    print(f"predicted host time per training pass: {predicted_us(result['training pass']):.1f} us "
          "(H200 unit costs, 2026-11-29; the benchmark prints the measured one beside it)")
    print(ledger_line(result["fused training pass"], "fused training pass (functional core, relu + residual)"))
    print(ledger_line(result["training pass"]))


if __name__ == "__main__":
    main()
