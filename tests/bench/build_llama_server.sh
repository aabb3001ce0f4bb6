#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the llama-cpp-python sdist
# that this venv has installed (the same llama.cpp opstream runs), into
# ~/.cache/opstream/llama-server/ (override with OPSTREAM_LLAMA_SERVER_DIR). About 15 minutes
# on 2 cores; needs cmake and a C++ compiler, and PyPI for the sdist. Used by bench_peer.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
out=${OPSTREAM_LLAMA_SERVER_DIR:-$HOME/.cache/opstream/llama-server}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF
cmake --build "$work/build" --target llama-server -j"$(nproc)"
mkdir -p "$out"
cp -a "$work"/build/bin/* "$out"/
echo "llama-server $version built into $out"
