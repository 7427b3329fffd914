"""Registers, stack, shared memory and SASS of every kernel instantiation, without a GPU.

NVRTC compiles ``syncbn.cu`` to a CUBIN for a real architecture (sm_90) and ``cuobjdump``
(PyPI: nvidia-cuda-cuobjdump; ``-sass`` also needs nvdisasm, nvidia-cuda-nvdisasm) reads it.
The register counts read this way equal Nsight Compute's on an H200. Used by
``tests/test_kernel_resources.py``; as a script it prints the table of docs/KERNELS.md:

    python tests/kernel_resources.py [--sass EXPR ...]
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cusyncbn import _kernels, _tuning  # noqa: E402


class Resources(NamedTuple):
    registers: int
    stack: int
    shared: int          # static, the system's 1 KiB reserve included (as cuobjdump reports it)
    local: int


def tool(name: str) -> str | None:
    """``name`` on the PATH, or in an installed nvidia-* wheel (site-packages/nvidia/*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for entry in sys.path:
        for path in glob.glob(os.path.join(entry, "nvidia", "*", "bin", name)):
            if os.access(path, os.X_OK):
                return path
    return None


def cubin(dtype_name: str, arch: str = "sm_90") -> tuple[bytes, dict[str, str]]:
    """(CUBIN, {mangled name: name expression}) of every instantiation for ``dtype_name``."""
    from cupy.cuda import nvrtc
    names = list(_kernels.name_expressions(dtype_name).values())
    prog = nvrtc.createProgram(_kernels.source(), "syncbn.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, [f"-arch={arch}", *_kernels.options()])
        lowered = {nvrtc.getLoweredName(prog, name): name for name in names}
        data = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    if data[:4] == b"\x7fELF" and len(data) % 8:       # CuPy 14.2 returns the ELF one byte short
        data += b"\0"
    return data, lowered


def _run(args: list[str], data: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(data)
    try:
        env = dict(os.environ)
        nvdisasm = tool("nvdisasm")
        if nvdisasm:
            env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
        return subprocess.run([*args, f.name], capture_output=True, text=True, check=True, env=env).stdout
    finally:
        os.remove(f.name)


def resources(dtype_name: str) -> dict[str, Resources]:
    """Name expression -> resources of every instantiation for ``dtype_name`` (sm_90)."""
    data, lowered = cubin(dtype_name)
    out, current = {}, None
    for line in _run([tool("cuobjdump"), "--dump-resource-usage"], data).splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = lowered.get(m.group(1))
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and current:
            out[current] = Resources(*map(int, m.groups()))
    return out


def sass(dtype_name: str) -> dict[str, str]:
    """Name expression -> SASS of every instantiation for ``dtype_name`` (sm_90)."""
    data, lowered = cubin(dtype_name)
    text = _run([tool("cuobjdump"), "-sass"], data)
    return {lowered[chunk.split()[0]]: chunk for chunk in text.split("Function : ")[1:]
            if chunk.split()[0] in lowered}


def hot_loop(code: str, load: str = "LDG.E.128") -> tuple[int, int]:
    """(instructions, vector loads) of the hot loop: of the innermost loops (a backward branch
    with no other backward branch inside its body), the one with the most ``load``
    instructions (16-byte loads by default: the full-batch loop of a 16-byte-vector kernel)."""
    lines = [l for l in code.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", l)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", l).group(1), 16) for l in lines]
    loops = []
    for i, l in enumerate(lines):
        target = re.search(r"BRA\W.*?0x([0-9a-f]+)", l)
        if target and int(target.group(1), 16) < addr[i]:
            loops.append((int(target.group(1), 16), addr[i]))
    best = (0, 0)
    for start, end in loops:
        if any(start <= s2 and e2 < end for s2, e2 in loops if (s2, e2) != (start, end)):
            continue                                        # not innermost
        body = [x for x, a in zip(lines, addr) if start <= a <= end]
        loads = sum(load in x for x in body)
        if loads > best[1]:
            best = (len(body), loads)
    return best


def occupancy(registers: int, threads: int, shared: int, limits: _tuning.SMLimits = _tuning.SM90) -> float:
    """Theoretical occupancy: resident warps over the SM's maximum."""
    return _tuning.resident_blocks(registers, threads, shared, limits) * threads / limits.threads


def block_threads(expr: str) -> int:
    """The block size the host heuristic launches ``expr`` with."""
    return _tuning.block_shape("cl" if "_cl<" in expr else "cs", _tuning.DEFAULT, 1024, 1, 4)[1]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sass"]:
        for expr in argv[1:]:
            dtype = next(d for d, t in _kernels.CTYPES.items() if f"<{t}," in expr)
            code = sass(dtype)[expr]
            n, loads = hot_loop(code)
            vec = int(expr.rstrip(">").split(",")[-1])
            print(f"{expr}: hot loop {n} instructions, {loads} 16-byte loads, "
                  f"{n / max(1, loads * vec):.2f} instructions per loaded element")
        return
    print("| kernel | regs | stack | static shared | block | occupancy |")
    print("|---|---|---|---|---|---|")
    for dtype in _kernels.CTYPES:
        for expr, r in sorted(resources(dtype).items()):
            threads = block_threads(expr)
            occ = occupancy(r.registers, threads, r.shared - 1024)
            print(f"| `{expr}` | {r.registers} | {r.stack} | {r.shared} | {threads} | {occ:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
