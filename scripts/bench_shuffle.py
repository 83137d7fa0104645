#!/usr/bin/env python3
"""Throughput of moeprep's compiled layout ops vs the memory limit vs the torch formulation.

For each case it prints GB/s (bytes read + bytes written by the op, the same count in every
column of a row) for:
  ours   moeprep.ops (compiled kernels),
  limit  a plain copy of the same bytes: ``clone`` for ops that allocate their output,
         ``copy_`` into a preallocated tensor for ``repack_into`` (which fills one); on CUDA a
         device-to-device copy,
  torch  the view/permute/contiguous formulation (what aiter does; int4 through int8 values).
Best of --repeat runs after --warmup runs.

    python scripts/bench_shuffle.py                 # CPU, ~256 MB per tensor
    python scripts/bench_shuffle.py --device cuda   # the same on a GPU
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from moeprep import ops


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def best_seconds(fn, device: str, warmup: int, repeat: int) -> float:
    run = timer(device)
    for _ in range(warmup):
        run(fn)
    return min(run(fn) for _ in range(repeat))


# ---- torch formulations -----------------------------------------------------------------------
def torch_shuffle(x: torch.Tensor) -> torch.Tensor:
    n, k = x.shape[-2:]
    return x.view(-1, n // 16, 16, k // 32, 2, 16).permute(0, 1, 3, 4, 2, 5).contiguous().view(x.shape)


def torch_pack_per8(v: torch.Tensor) -> torch.Tensor:
    u = (v.view(torch.uint8) & 0xF).view(-1, 2, 4)
    return (u[:, 0] | (u[:, 1] << 4)).view(*v.shape[:-1], v.shape[-1] // 2)


def torch_preshuffle(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    v = torch.stack([codes & 0xF, codes >> 4], dim=-1).view(*codes.shape[:-1], -1).view(torch.int8)
    if signed:
        v = v - 8
    n, k = v.shape[-2:]
    y = v.view(-1, n // 16, 16, k // 32, 2, 16).permute(0, 1, 3, 4, 2, 5).contiguous().view(v.shape)
    return torch_pack_per8(y)


_AWQ_POS = [0, 4, 1, 5, 2, 6, 3, 7]  # nibble holding column c % 8


def torch_codes_from(words: torch.Tensor, packing: str) -> torch.Tensor:
    """uint8 codes [n, K] from AWQ [K, n/8] or GPTQ [K/8, n] int32 words."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    if packing == "awq_int32":
        nib = (words.unsqueeze(-1) >> shifts[_AWQ_POS]) & 0xF  # [K, n/8, 8 columns]
        return nib.to(torch.uint8).view(words.shape[0], -1).t()
    nib = (words.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [K/8, 8, n]
    return nib.to(torch.uint8).view(-1, words.shape[1]).t()


def torch_repack(dst: torch.Tensor, srcs: list, packing: str, signed: bool) -> torch.Tensor:
    for e, words in enumerate(srcs):
        q = torch_codes_from(words, packing)
        v = q.view(torch.int8) - 8 if signed else q.view(torch.int8)
        n, k = v.shape
        y = v.reshape(n // 16, 16, k // 32, 2, 16).permute(0, 2, 3, 1, 4).contiguous().view(n, k)
        dst[e].copy_(torch_pack_per8(y))
    return dst


def torch_e8m0_shuffle(s: torch.Tensor) -> torch.Tensor:
    m, ks = s.shape
    return s.view(m // 32, 2, 16, ks // 8, 2, 4).permute(0, 3, 5, 2, 4, 1).contiguous().view(m, ks)


# ---- cases ------------------------------------------------------------------------------------
def random_bytes(shape, device: str) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


def random_words(shape, device: str) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device)


def cases(mb: int, device: str) -> list:
    """(name, bytes moved, ours, limit, limit name, torch) per case; every tensor ~mb MiB."""
    out = []
    experts, n = 32, 2048
    k_bytes = mb * 2**20 // (experts * n) // 64 * 64
    x = random_bytes((experts, n, k_bytes), device)
    moved = 2 * x.numel()
    out.append(("shuffle_weight uint8 " + "x".join(map(str, x.shape)), moved,
                lambda: ops.shuffle_weight(x), lambda: x.clone(), "clone", lambda: torch_shuffle(x)))
    out.append(("preshuffle_int4 " + "x".join(map(str, x.shape)), moved,
                lambda: ops.preshuffle_int4(x, True), lambda: x.clone(), "clone", lambda: torch_preshuffle(x, True)))

    k = 2 * k_bytes
    dst = torch.zeros((experts, n, k_bytes), dtype=torch.uint8, device=device)
    flat = dst.view(-1)
    for packing, layout in (("awq_int32", "w4a16_unsigned"), ("gptq_int32", "w4a16_signed")):
        shape = (k, n // 8) if packing == "awq_int32" else (k // 8, n)
        srcs = [random_words(shape, device) for _ in range(experts)]
        src_all = torch.cat([s.view(-1) for s in srcs]).view(torch.uint8)

        def ours(srcs=srcs, packing=packing, layout=layout):
            for e, s in enumerate(srcs):
                ops.repack_into(dst, s, src_packing=packing, layout=layout, expert=e)
            return dst

        out.append((f"repack_into {packing}->{layout} {experts}x[{n},{k}]", 2 * dst.numel(), ours,
                    lambda src_all=src_all: flat.copy_(src_all), "copy_",
                    lambda srcs=srcs, packing=packing, layout=layout: torch_repack(dst, srcs, packing, layout == "w4a16_signed")))

    rows = mb * 2**20 // 256 // 256 * 256
    s = random_bytes((rows, 256), device)
    out.append((f"shuffle_scale e8m0 {rows}x256", 2 * s.numel(),
                lambda: ops.shuffle_scale(s), lambda: s.clone(), "clone", lambda: torch_e8m0_shuffle(s)))
    return out


def check_equal(name: str, ours, torch_version) -> None:
    """The torch formulation must produce the same bytes (it is the thing we compare with).
    The repack cases fill the same dst, so the torch result is copied first."""
    want = torch_version().clone()
    if not torch.equal(ours(), want):
        raise SystemExit(f"bench_shuffle: {name}: ours and the torch formulation differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mb", type=int, default=256, help="MiB per benchmarked tensor (default 256)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_shuffle: --device cuda but torch sees no CUDA device")

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                 f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                 f"load avg {os.getloadavg()[0]:.2f} before start")
    print(f"# bench_shuffle --device {args.device} --mb {args.mb}: {where}")
    print(f"# GB/s = (bytes read + bytes written) / best of {args.repeat} (after {args.warmup} warm-up)")
    header = f"| {'case':<58} | {'ours':>7} | {'limit':>7} | {'limit op':<8} | {'torch':>7} | {'ours/limit':>10} | {'ours/torch':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, moved, ours, limit, limit_name, torch_version in cases(args.mb, args.device):
        check_equal(name, ours, torch_version)
        rates = [moved / best_seconds(fn, args.device, args.warmup, args.repeat) / 1e9 for fn in (ours, limit, torch_version)]
        print(f"| {name:<58} | {rates[0]:7.2f} | {rates[1]:7.2f} | {limit_name:<8} | {rates[2]:7.2f} | "
              f"{rates[0] / rates[1]:9.2f}x | {rates[0] / rates[2]:9.2f}x |", flush=True)


if __name__ == "__main__":
    main()
