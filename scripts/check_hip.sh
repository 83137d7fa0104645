#!/usr/bin/env bash
# Compile-checks the GPU kernel source (csrc/gpu_kernels.cu, no torch headers) as HIP for
# gfx90a with Debian's hipcc, installing it first if missing. Fails loudly on any error.
#
#   scripts/check_hip.sh            # from anywhere; needs apt (root) only if hipcc is missing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/csrc/gpu_kernels.cu"
arch="${HIP_ARCH:-gfx90a}"

if ! command -v hipcc >/dev/null 2>&1; then
    echo "check_hip: installing hipcc (Debian packages hipcc, libamdhip64-dev)..."
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    if ! { apt-get update -qq && apt-get install -y -qq hipcc libamdhip64-dev; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "check_hip: FAILED: could not install hipcc" >&2
        exit 1
    fi
    rm -f "$log"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
# -x hip: the .cu suffix would otherwise not be treated as HIP by every hipcc version
if ! HIP_PLATFORM=amd hipcc -x hip --offload-arch="$arch" -std=c++17 -O3 -Wall -Werror \
        -c "$src" -o "$out/gpu_kernels.o"; then
    echo "check_hip: FAILED: $src does not compile as HIP for $arch" >&2
    exit 1
fi
version="$(hipcc --version 2>/dev/null | sed -n 's/.*HIP version: *//p' | head -n1)"
echo "check_hip: OK: $src compiles as HIP for $arch ($(( $(date +%s) - start )) s, HIP ${version:-unknown})"
