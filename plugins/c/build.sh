#!/usr/bin/env bash
# Builds Kiln's C examples into components:
#   plugins/c/build.sh OUT_DIR   ->  OUT_DIR/{word-count,fails,fail-fast}.wasm
# Needs Debian's clang, lld, wasi-libc and libclang-rt-14-dev-wasm32, and cargo: the
# bindings and the component step come from tools/ (wit-bindgen's C generator 0.63.0,
# wit-component, and the WASI reactor adapter of wasmtime 48.0.8, all from crates.io),
# built once into KILN_C_TOOLS_TARGET (default OUT_DIR/.tools) instead of installing
# wit-bindgen-cli and wasm-tools.
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
need cargo "install Rust (rustup.rs)"
# clang alone is not enough: it needs the wasm32-wasi sysroot and runtime library.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf 'int main(void) { return 0; }\n' > "$probe/probe.c"
if ! clang --target=wasm32-wasi -mexec-model=reactor -o "$probe/probe.wasm" "$probe/probe.c" 2>/dev/null; then
    echo "need wasi-libc and clang's wasm32 runtime: apt-get install lld wasi-libc libclang-rt-14-dev-wasm32" >&2
    exit 3
fi
tools_target="${KILN_C_TOOLS_TARGET:-$out/.tools}"
cargo build --release --locked --quiet --manifest-path "$here/tools/Cargo.toml" --target-dir "$tools_target"
tools="$tools_target/release/kiln-c-tools"
build() { # world source output
    local gen="$out/gen-$1"
    "$tools" bindgen "$wit" "$1" "$gen"
    clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -I "$gen" \
        -o "$out/$3.core.wasm" "$here/$2" "$gen/$1.c" "$gen/$1_component_type.o"
    "$tools" component "$out/$3.core.wasm" "$out/$3.wasm"
    rm "$out/$3.core.wasm"
}
build job job/word_count.c word-count
build job fail/fails.c fails
build policy policy/fail_fast.c fail-fast
