#!/usr/bin/env bash
# Builds Kiln's C examples into components:
#   plugins/c/build.sh OUT_DIR   ->  OUT_DIR/{word-count,fails,fail-fast}.wasm
# Needs Debian's clang, lld, wasi-libc and libclang-rt-14-dev-wasm32, plus
# wit-bindgen-cli 0.63.0 and wasm-tools 1.263.0 (cargo install --locked ...), and the
# WASI reactor adapter of wasmtime 48.0.8 (fetched from crates.io into OUT_DIR).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wit="$here/../../wit"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "need $1: $2" >&2
        exit 3
    fi
}
need clang "apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"
need wit-bindgen "cargo install --locked wit-bindgen-cli@0.63.0"
need wasm-tools "cargo install --locked wasm-tools@1.263.0"
# clang alone is not enough: it needs the wasm32-wasi sysroot and runtime library.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf 'int main(void) { return 0; }\n' > "$probe/probe.c"
if ! clang --target=wasm32-wasi -mexec-model=reactor -o "$probe/probe.wasm" "$probe/probe.c" 2>/dev/null; then
    echo "need wasi-libc and clang's wasm32 runtime: apt-get install lld wasi-libc libclang-rt-14-dev-wasm32" >&2
    exit 3
fi
adapter="$out/wasi_snapshot_preview1.reactor.wasm"
if [ ! -f "$adapter" ]; then
    curl -sSfL https://static.crates.io/crates/wasi-preview1-component-adapter-provider/48.0.8/download \
        | tar -xzO wasi-preview1-component-adapter-provider-48.0.8/artefacts/wasi_snapshot_preview1.reactor.wasm > "$adapter.part"
    mv "$adapter.part" "$adapter"
fi
build() { # world source output
    local gen="$out/gen-$1"
    wit-bindgen c "$wit" --world "$1" --out-dir "$gen" >/dev/null
    clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -I "$gen" \
        -o "$out/$3.core.wasm" "$here/$2" "$gen/$1.c" "$gen/$1_component_type.o"
    wasm-tools component new "$out/$3.core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out/$3.wasm"
    rm "$out/$3.core.wasm"
}
build job job/word_count.c word-count
build job fail/fails.c fails
build policy policy/fail_fast.c fail-fast
