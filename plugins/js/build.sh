#!/usr/bin/env bash
# Builds Kiln's JavaScript examples into components:
#   plugins/js/build.sh OUT_DIR   ->  OUT_DIR/{word-count,fails}.wasm
# Needs node and componentize-qjs 0.4.5: cd plugins/js && npm install
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
tool="$here/node_modules/.bin/componentize-qjs"
if [ ! -x "$tool" ]; then
    echo "need componentize-qjs 0.4.5: cd $here && npm install" >&2
    exit 3
fi
# --sync: Kiln's host does not enable component-model async.
"$tool" --sync --wit "$here/wit" --world job --js "$here/job/word-count.js" -o "$out/word-count.wasm"
"$tool" --sync --wit "$here/wit" --world job --js "$here/fail/fails.js" -o "$out/fails.wasm"
