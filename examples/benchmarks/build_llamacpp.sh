#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-cli, llama-completion)
# into a cache folder outside the repository, for tests/test_gguf_export.py and bench_llamacpp.py.
#
#   examples/benchmarks/build_llamacpp.sh            # -> ~/.cache/hf-decoupleq/llama.cpp/build/bin/
#   HF_DECOUPLEQ_LLAMA_CPP=/some/dir examples/benchmarks/build_llamacpp.sh
#
# The source is the llama.cpp vendored in the llama-cpp-python sdist on PyPI (pinned below), fetched with pip.
# An existing build is reused: the script only builds targets that are missing. About 10+ minutes on 2 cores.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${HF_DECOUPLEQ_LLAMA_CPP:-$HOME/.cache/hf-decoupleq/llama.cpp}"
TARGETS=(llama-quantize llama-imatrix llama-perplexity llama-cli llama-completion)
JOBS="${JOBS:-$(nproc)}"

missing=()
for t in "${TARGETS[@]}"; do
    [ -x "$ROOT/build/bin/$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "llama.cpp tools already built in $ROOT/build/bin"
    exit 0
fi

if [ ! -f "$ROOT/CMakeLists.txt" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    mkdir -p "$(dirname "$ROOT")"
    rm -rf "$ROOT"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT"
fi

cd "$ROOT"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=ON
cmake --build build --target "${missing[@]}" -j "$JOBS"
echo "built ${missing[*]} in $ROOT/build/bin"
