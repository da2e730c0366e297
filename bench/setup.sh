#!/usr/bin/env bash
# One-time set-up for bench/run.py (never part of CI): llorch with its `bench` extra (HF transformers +
# torch, ONNX Runtime + onnx + onnxscript for the export, gguf, threadpoolctl, matplotlib), then
# llama-cpp-python compiled from source for this CPU.
#
# llama-cpp-python is not in the extra: a plain `pip install` of it compiles llama.cpp for a generic x86-64,
# and only CMAKE_ARGS="-DGGML_NATIVE=ON" makes it use this CPU's AVX2/AVX-512, which an extra cannot say.
# The compile takes ~7 minutes on 2 cores (much longer on a busy machine). Skipped when llama_cpp already
# imports; FORCE_LLAMA=1 rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."

# keep an editable (development) install editable
editable=()
if python -m pip show llorch 2>/dev/null | grep -q '^Editable project location'; then
    editable=(-e)
fi
echo "=== pip install ${editable[*]} .[bench]"
python -m pip install "${editable[@]}" ".[bench]"

if python -c "import llama_cpp" 2>/dev/null && [ "${FORCE_LLAMA:-0}" != 1 ]; then
    echo "=== llama-cpp-python $(python -c 'import llama_cpp; print(llama_cpp.__version__)') already installed"
else
    echo "=== llama-cpp-python from source, GGML_NATIVE=ON (several minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=ON" python -m pip install --no-cache-dir --no-binary llama-cpp-python \
        --force-reinstall --no-deps llama-cpp-python
    python -m pip install llama-cpp-python          # its Python dependencies (numpy, jinja2, diskcache, ...)
fi

python - <<'PY'
import importlib.metadata as md
for dist in ("llorch", "torch", "transformers", "onnxruntime", "onnx", "onnxscript", "gguf", "llama-cpp-python",
             "matplotlib", "threadpoolctl"):
    try:
        print(f"{dist:18s} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist:18s} MISSING")
PY
echo "next: python bench/run.py --quick   (then python bench/run.py for the real thing)"
