#!/usr/bin/env bash
# Installs torch (TORCH, default torch==2.13.0) into the Python PY (default python3) for `make setup`:
# the CPU build from PyTorch's own CPU wheel index where that index answers, so that a machine
# without a GPU downloads no CUDA wheels; otherwise from PyPI, saying so (on Linux x86-64 PyPI's
# torch is the CUDA build: several GB of wheels). The Triton interpreter tests need Triton, which
# the CPU build does not bring: TRITON (default triton==3.8.0) is installed where torch came
# without one.
set -euo pipefail
py="${PY:-python3}"
torch_spec="${TORCH:-torch==2.13.0}"
triton_spec="${TRITON:-triton==3.8.0}"
cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

answers() {  # whether the index serves torch's page, asked once with a short timeout
    "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=15)' "$cpu_index" \
        >/dev/null 2>&1
}

if answers; then
    "$py" -m pip install -q --index-url "$cpu_index" "$torch_spec"
else
    echo "install_torch: PyTorch's CPU wheel index ($cpu_index) did not answer: installing $torch_spec from PyPI" \
         "(on Linux x86-64 that is the CUDA build, several GB)" >&2
    "$py" -m pip install -q "$torch_spec"
fi
if ! "$py" -c "import triton" 2>/dev/null; then
    "$py" -m pip install -q "$triton_spec"
fi
