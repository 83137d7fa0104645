"""Static census of the CUDA decode GEMMs (csrc/moe_decode.cu): warp instructions per 64-k window.

The decode GEMMs are bound by the instructions they issue per byte of weights
(docs/design/decode-gemms.md), and that count can be read off the compiled code without a GPU: this compiles
moe_decode.cu for sm_90a with nvcc, disassembles it with cuobjdump and counts each kernel's main
loop (the backward branch spanning the most MMAs, which runs STAGES windows per turn). With
``--base REV`` it compiles that git revision's csrc/ too and prints both side by side.

    python3 scripts/sass_census.py [--base main] [--cuobjdump PATH]

cuobjdump ships with the CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump``
(nvidia/cu13/bin/cuobjdump in site-packages), which this finds by itself.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = re.compile(r"(w13|w2)_kernelILi(\d)ELi(\d)ELNS0_5CodesE(\d)ELb([01])")
CODES = ("signed", "zp", "e2m1")
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def find_cuobjdump(given: str | None) -> str:
    candidates = [given, shutil.which("cuobjdump"),
                  str(Path(sysconfig.get_paths()["purelib"]) / "nvidia/cu13/bin/cuobjdump")]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    sys.exit("cuobjdump not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`, or pass --cuobjdump")


def compile_cubin(csrc: Path, out: Path) -> dict[str, tuple[int, int]]:
    """Compiles moe_decode.cu; returns {kernel: (registers, spill store bytes)} from ptxas."""
    log = subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", f"-I{csrc}",
                          "-cubin", "-Xptxas", "-v", "-o", str(out), str(csrc / "moe_decode.cu")],
                         capture_output=True, text=True)
    if log.returncode:
        sys.exit(log.stderr[-3000:])
    facts, name = {}, None
    for line in log.stderr.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name:
            facts.setdefault(name, [0, 0])[1] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            facts.setdefault(name, [0, 0])[0] = int(m.group(1))
    return {k: tuple(v) for k, v in facts.items()}


def census(cubin: Path, cuobjdump: str, facts: dict) -> dict[tuple, tuple]:
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    rows = {}
    for func in re.split(r"\n\s+Function : ", sass)[1:]:
        name = func.split("\n", 1)[0].strip()
        m = KERNEL.search(name)
        if not m:
            continue
        kind, warps, stages, codes, g32 = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))
        ins = [(int(a, 16), op, rest) for a, op, rest in INSTRUCTION.findall(func)]
        loops = []  # (MMAs, opcodes) of each backward branch's body
        for a, op, rest in ins:
            t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
            if t and int(t.group(1), 16) < a:
                body = [o for x, o, _ in ins if int(t.group(1), 16) <= x <= a]
                loops.append((sum(o.startswith("HMMA") for o in body), body))
        best = max(loops, key=lambda loop: loop[0])[1]
        ops = collections.Counter(o.split(".")[0] for o in best)
        regs, spill = facts.get(name, (0, 0))
        top = " ".join(f"{k} {v / stages:.0f}" for k, v in ops.most_common(6))
        rows[(kind, warps, stages, CODES[codes], g32)] = (len(best) / stages, regs, spill, top)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a git revision to compare with (its csrc/)")
    ap.add_argument("--cuobjdump")
    args = ap.parse_args()
    tool = find_cuobjdump(args.cuobjdump)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        new = census(tmp / "new.cubin", tool, compile_cubin(ROOT / "csrc", tmp / "new.cubin"))
        base = {}
        if args.base:
            (tmp / "base").mkdir()
            tar = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "csrc"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp / "base")], input=tar, check=True)
            base = census(tmp / "base.cubin", tool, compile_cubin(tmp / "base" / "csrc", tmp / "base.cubin"))
    print("| GEMM | warps | stages | codes | groups of 32 | " + (f"{args.base} per window | " if base else "")
          + "per window | registers | spill bytes | most frequent, per window |")
    print("|---" * (10 if base else 9) + "|")
    for key in sorted(new):
        per, regs, spill, top = new[key]
        was = f"{base[key][0]:.1f} | " if key in base else ("- | " if base else "")
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {'yes' if key[4] else 'no'} | {was}{per:.1f} | {regs} | {spill} | {top} |")


if __name__ == "__main__":
    main()
