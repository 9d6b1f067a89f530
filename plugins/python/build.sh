#!/usr/bin/env bash
# Builds Kiln's Python examples into components:
#   plugins/python/build.sh OUT_DIR   ->  OUT_DIR/{word-count,fails,events-file}.wasm
# Needs componentize-py 0.25.1: pip install -r plugins/python/requirements.txt
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wit="$here/../../wit"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
want="componentize-py 0.25.1"
have="$(componentize-py --version 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
    echo "need $want (found: ${have:-none}); pip install -r $here/requirements.txt" >&2
    exit 3
fi
componentize-py -d "$wit" -w job componentize word_count -p "$here/job" -o "$out/word-count.wasm"
componentize-py -d "$wit" -w job componentize fails -p "$here/fail" -o "$out/fails.wasm"
componentize-py -d "$wit" -w reporter componentize events_file -p "$here/reporter" -o "$out/events-file.wasm"
