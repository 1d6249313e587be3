"""Static instruction counts of compiled kernels: what a kernel's hottest loop is made of.

    python scripts/sass_stats.py LIB.so [LIB.so ...] [--function REGEX]
    python scripts/sass_stats.py --prefill          # our prefill kernels' two tile shapes (sm_90a builds)

For every kernel function in each library (``cuobjdump -sass``): its instruction count, the loops
(a backward branch and its target), and for the loop holding the most tensor-core MMAs (HMMA) its
opcode histogram, instructions per HMMA and local-memory spill traffic (LDL/STL). Works without a
GPU, on our JIT builds and on any other library with SASS for the same arch (e.g. a peer's
ahead-of-time kernels), so two kernels' inner loops can be compared before spending device time.
Counts are static: a loop's instructions, not how often they run or how long they take.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_FUNCTION = re.compile(r"Function : (\S+)")
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


@dataclass
class Loop:
    start: int
    end: int
    opcodes: collections.Counter

    @property
    def size(self) -> int:
        return sum(self.opcodes.values())

    @property
    def mmas(self) -> int:
        return self.opcodes["HMMA"]


def opcode(instruction: str) -> str:
    """Base opcode, without predicate and modifiers: '@!P0 HMMA.16816.F32.BF16 R4, ...' -> 'HMMA'."""
    return _PREDICATE.sub("", instruction).split(" ", 1)[0].split(".", 1)[0]


def parse(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{function name: [(address, instruction), ...]} from ``cuobjdump -sass`` text."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if m := _FUNCTION.search(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append((int(m.group(1), 16), m.group(2)))
    return functions


def loops(instructions: list[tuple[int, str]]) -> list[Loop]:
    """Every backward branch's body, most MMAs first."""
    found = []
    for address, text in instructions:
        if opcode(text) != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = collections.Counter(opcode(t) for a, t in instructions if start <= a <= address)
            found.append(Loop(start, address, body))
    return sorted(found, key=lambda loop: (loop.mmas, loop.size), reverse=True)


def report(name: str, instructions: list[tuple[int, str]], top: int = 24) -> str:
    lines = [f"{name}: {len(instructions)} instructions"]
    hot = loops(instructions)
    if not hot or not hot[0].mmas:
        lines.append("  no loop with MMAs")
        return "\n".join(lines)
    loop = hot[0]
    inside = {a for a, _ in instructions if loop.start <= a <= loop.end}
    outside = collections.Counter(opcode(t) for a, t in instructions if a not in inside)
    lines.append(
        f"  hottest loop {loop.start:#x}-{loop.end:#x}: {loop.size} instructions, {loop.mmas} HMMA "
        f"({loop.size / loop.mmas:.2f} per HMMA), spills LDL {loop.opcodes['LDL']} / STL {loop.opcodes['STL']}"
    )
    lines.append("    " + ", ".join(f"{k} {v}" for k, v in loop.opcodes.most_common(top)))
    lines.append(
        f"  outside it: {sum(outside.values())} instructions, global stores STG {outside['STG']}, "
        f"spills LDL {outside['LDL']} / STL {outside['STL']}"
    )
    return "\n".join(lines)


def cuobjdump() -> str:
    """The toolkit's cuobjdump, else one on PATH, else the copy triton ships beside torch."""
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("no cuobjdump found: set CUDA_HOME to a full CUDA toolkit, or install triton")


def sass_of(library: str) -> str:
    return subprocess.run([cuobjdump(), "-sass", library], capture_output=True, text=True, check=True).stdout


def prefill_libraries() -> list[str]:
    """Our prefill kernel (bf16, head dim 128, default variant) at both tile shapes, built for sm_90a."""
    import torch

    from engine_backend import prefill
    from engine_backend.kernels import jit, specs
    from engine_backend.variants import DEFAULT

    return [str(jit.build(specs.prefill_spec(torch.bfloat16, 128, DEFAULT, tile), "90a"))
            for tile in prefill.tile_shapes(128)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="*", help="shared libraries or cubins holding SASS")
    parser.add_argument("--function", default="", help="only functions whose mangled name matches this regex")
    parser.add_argument("--prefill", action="store_true", help="add our prefill kernel's two tile shapes")
    args = parser.parse_args(argv)
    libraries = list(args.libraries) + (prefill_libraries() if args.prefill else [])
    if not libraries:
        parser.error("name a library or pass --prefill")
    for library in libraries:
        print(f"== {library}")
        for name, instructions in parse(sass_of(library)).items():
            if re.search(args.function, name):
                print(report(name, instructions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
