"""Whole-model benchmark (``python -m cusyncbn.bench --model``): a training step of
torchvision's ResNet-50 on one GPU, with torch's own ``BatchNorm2d`` (cuDNN, unsynced)
and with every batch norm converted by :func:`cusyncbn.torch.convert_sync_batchnorm`
on a 1-rank NCCL communicator.

A training step is forward, cross-entropy loss, backward, ``optimizer.step()`` (SGD with
momentum) and ``optimizer.zero_grad(set_to_none=True)``. Rows: input 32 x 3 x 224 x 224
and 2 x 3 x 512 x 512 (the small per-GPU batch of detection training), each in float32
(TF32 off, NCHW) and in bfloat16 autocast with ``channels_last`` model and input. Both
models of a row start from the same weights and see the same input and labels; their
steps alternate. Each step is timed with CUDA events recorded around it and a
synchronize after it (so host time the GPU waits for is counted), after warm-up steps
(which include cuDNN's autotuning: ``torch.backends.cudnn.benchmark = True``). Reported:
images per second (batch size over the median step time) of each model and their ratio,
converted over plain; the target is a ratio of at least :data:`TARGET` on every row.

The pure parts (:func:`model_rows`, :func:`format_model_table`, :func:`write_model_report`)
need no GPU; :func:`main` skips with a one-line message, exit status 0, when torchvision,
CuPy or a CUDA device is missing.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Iterable, NamedTuple, Optional, Sequence

from ._bench_cases import cuda_ms

TARGET = 0.97                   # converted images/s over plain images/s, on every row
INPUTS = ((32, 3, 224, 224), (2, 3, 512, 512))    # (N, C, H, W)
PRECISIONS = ("float32", "bfloat16")
REPS, WARMUP = 20, 5            # timed and warm-up steps per model and row
QUICK_REPS, QUICK_WARMUP = 5, 2


class ModelRow(NamedTuple):
    """One row of the whole-model benchmark.

    ``shape`` is the input's (N, C, H, W); ``plain`` and ``converted`` are images per
    second (N over the median step time in seconds), NaN where that model's run failed;
    ``ratio`` is converted / plain (NaN when either failed); ``meets`` is whether
    ``ratio`` >= the target (False when either failed).
    """
    shape: tuple
    precision: str
    plain: float
    converted: float
    ratio: float
    meets: bool

    @property
    def batch(self) -> int:
        """The batch size N."""
        return self.shape[0]


def images_per_second(batch: int, step_seconds: Sequence[float]) -> float:
    """``batch`` images over the median of ``step_seconds`` (one training step's time each,
    in seconds).

    Raises:
        ValueError: ``step_seconds`` is empty, or holds a time that is not a finite
            positive number.
    """
    times = list(step_seconds)
    if not times:
        raise ValueError("no step times")
    bad = [t for t in times if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"step times must be finite and positive seconds, got {bad[0]!r}")
    return batch / statistics.median(times)


def model_rows(times: Iterable[tuple], target: float = TARGET) -> list[ModelRow]:
    """Rows of the report from measured step times.

    Args:
        times: ``(shape, precision, plain_seconds, converted_seconds)`` per row: the
            input's (N, C, H, W), ``"float32"`` or ``"bfloat16"``, and each model's timed
            training steps in seconds (a list; None where that model's run failed).
        target: the converted/plain images-per-second ratio a row must reach.

    Returns:
        One :class:`ModelRow` per entry of ``times``, in the same order.

    Raises:
        ValueError: a list of step times is empty or holds a time that is not a finite
            positive number.
    """
    rows = []
    for shape, precision, plain_s, converted_s in times:
        shape = tuple(shape)
        plain = math.nan if plain_s is None else images_per_second(shape[0], plain_s)
        converted = math.nan if converted_s is None else images_per_second(shape[0], converted_s)
        ratio = converted / plain
        rows.append(ModelRow(shape, precision, plain, converted, ratio, bool(ratio >= target)))
    return rows


def _shape_text(shape: tuple) -> str:
    return " x ".join(str(n) for n in shape)


def _number(value: float, digits: int) -> str:
    return "failed" if math.isnan(value) else f"{value:.{digits}f}"


def summary_line(rows: Sequence[ModelRow], target: float = TARGET) -> str:
    """One line: the smallest converted/plain ratio with its batch size and precision, and
    how many rows reach ``target`` (and how many failed, if any)."""
    ran = [r for r in rows if not math.isnan(r.ratio)]
    if ran:
        worst = min(ran, key=lambda r: r.ratio)
        low = f"{worst.ratio:.3f} (batch {worst.batch}, {worst.precision})"
    else:
        low = "n/a"
    line = (f"model: converted/plain images/s ratio min {low}; "
            f"{sum(r.meets for r in rows)} of {len(rows)} rows >= {target:g}")
    failed = len(rows) - len(ran)
    return line + (f"; {failed} failed" if failed else "")


def format_model_table(rows: Sequence[ModelRow], target: float = TARGET) -> str:
    """A markdown table of ``rows`` (images/s to one decimal, ratio to three), a blank
    line and :func:`summary_line`."""
    lines = [f"| input (N x C x H x W) | precision | plain images/s | converted images/s | converted/plain "
             f"| >= {target:g} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_shape_text(r.shape)} | {r.precision} | {_number(r.plain, 1)} | "
                     f"{_number(r.converted, 1)} | {_number(r.ratio, 3)} | {'yes' if r.meets else 'no'} |")
    return "\n".join(lines) + "\n\n" + summary_line(rows, target)


def write_model_report(out: str, rows: Sequence[ModelRow], head: str = "", target: float = TARGET) -> str:
    """Write ``head`` (if any), a blank line and :func:`format_model_table` to
    ``<out>/model.md`` (making ``out`` if needed) and return that text."""
    text = (head + "\n\n" if head else "") + format_model_table(rows, target) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.md"), "w") as f:
        f.write(text)
    return text


def missing() -> list[str]:
    """What the benchmark lacks on this machine, each with what to install (empty: it can run)."""
    reasons = []
    try:
        import torch
    except ImportError:
        return ["torch and torchvision are not installed (pip install torch torchvision)"]
    try:
        import torchvision  # noqa: F401
    except Exception as exc:        # absent, or built for another torch
        reasons.append(f"torchvision is not importable ({type(exc).__name__}: {exc}; pip install torchvision)")
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        reasons.append(f"CuPy is not importable ({type(exc).__name__}: {exc}; pip install cupy-cuda12x)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    return reasons


def _time_step(step) -> float:
    """Seconds of one ``step()``, between CUDA events recorded before and after it."""
    return cuda_ms(step) * 1e-3


def _resnet50():
    import torchvision
    return torchvision.models.resnet50()


def _measure(shape: tuple, precision: str, comm, reps: int, warmup: int, *, make_model=_resnet50,
             device: str = "cuda", time_step=_time_step) -> tuple:
    """Step times (seconds) of the plain and the converted model (``make_model()``, 1000
    classes) at one row, each None if that model failed; prints progress. The tests run it
    on the CPU with a small model and a host timer."""
    import copy

    import torch

    from cusyncbn.torch import SyncBatchNorm, convert_sync_batchnorm
    if device == "cuda":
        torch.cuda.empty_cache()                         # what the row before left cached
    bf16 = precision == "bfloat16"
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    torch.manual_seed(0)
    plain = make_model().to(device).to(memory_format=memory_format).train()
    converted = convert_sync_batchnorm(copy.deepcopy(plain), comm=comm)
    n_bn = sum(isinstance(m, SyncBatchNorm) for m in converted.modules())
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape, device=device, generator=g).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (shape[0],), device=device, generator=g)

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        last = {}

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last.setdefault("first loss", loss.detach())
        return step, last

    steps = {"plain": make_step(plain), "converted": make_step(converted)}
    alive = dict.fromkeys(steps, True)
    times = {name: [] for name in steps}

    def run(name, timed):
        if not alive[name]:
            return
        try:
            if timed:
                times[name].append(time_step(steps[name][0]))
            else:
                steps[name][0]()
        except Exception as exc:
            alive[name] = False
            print(f"  {_shape_text(shape)} {precision} {name}: failed ({type(exc).__name__}: {exc})", flush=True)

    for _ in range(warmup):
        for name in steps:
            run(name, False)
    if device == "cuda":
        torch.cuda.synchronize()
    losses = {n: float(s[1]["first loss"]) for n, s in steps.items() if alive[n] and "first loss" in s[1]}
    for _ in range(reps):
        for name in steps:
            run(name, True)
    result = tuple(times[n] if alive[n] else None for n in steps)
    print(f"  {_shape_text(shape)} {precision}: {n_bn} batch norms converted; first-step loss "
          + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + "; median step "
          + ", ".join(f"{n} {statistics.median(t) * 1e3:.2f} ms" for n, t in zip(steps, result) if t),
          flush=True)
    return result


def main(out: str = "bench_out", reps: Optional[int] = None, quick: bool = False) -> int:
    """Run the whole-model benchmark, print the table and write ``<out>/model.md``.

    Args:
        out: directory of the report.
        reps: timed steps per model and row (default :data:`REPS`, or
            :data:`QUICK_REPS` with ``quick``).
        quick: fewer warm-up and timed steps.

    Returns:
        The exit status: 0 (also when skipped for a missing torchvision, CuPy or CUDA
        device: one line says what is missing); 2 for ``reps`` < 1 or a communicator of
        more than one rank.
    """
    if reps is not None and reps < 1:
        print(f"cusyncbn.bench --model: --reps must be at least 1, got {reps}", file=sys.stderr)
        return 2
    reasons = missing()
    if reasons:
        print("cusyncbn.bench --model: skipped: " + "; ".join(reasons))
        return 0
    import torch

    from ._bench_cases import nccl_comm
    comm = nccl_comm()
    if comm.size != 1:
        print(f"cusyncbn.bench --model: needs a 1-rank communicator, got {comm!r} (run it as one process, "
              "not under mpirun)", file=sys.stderr)
        return 2
    reps = reps or (QUICK_REPS if quick else REPS)
    warmup = QUICK_WARMUP if quick else WARMUP
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    print(f"{card}: ResNet-50 training step, {warmup} warm-up and {reps} timed steps per model and row; "
          f"converted model's communicator: {comm!r}", flush=True)
    try:
        times = [(shape, precision) + _measure(shape, precision, comm, reps, warmup)
                 for shape in INPUTS for precision in PRECISIONS]
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = flags
    import torchvision
    head = (f"Card: {card}; date: {time.strftime('%Y-%m-%d')}; torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}; communicator {comm!r}; {warmup} warm-up and {reps} timed steps "
            f"per model and row (median); float32 with TF32 off, bfloat16 autocast with channels_last; "
            f"target: converted/plain >= {TARGET:g} on every row")
    text = write_model_report(out, model_rows(times), head)
    print("\n" + text, end="")
    return 0
