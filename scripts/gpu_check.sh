#!/usr/bin/env bash
# The paper-scale check on a fresh GPU machine, one command (docs/gpu.md):
#   scripts/gpu_check.sh [--pretrained data/pretrained/stable-diffusion-v1-5] [benchmarks.gpu args]
# 1. Imports every library the check needs; the missing ones are installed (no network, no deps
#    resolution) from the wheels in $DZAD_WHEELS (default: .whl in the repo root) into
#    $DZAD_SITE (default /tmp/dzad-site), which goes first on PYTHONPATH. The repo itself is not
#    installed: it runs from this checkout, so the machine's own Python and torch are used.
# 2. Prints {"phase": "install", ...}, then runs `python -m benchmarks.gpu --check`: one JSON line
#    per phase as it ends. Exit code: the check's (1 when a phase failed), 3 when a library is
#    missing and no wheel folder is there.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${DZAD_WHEELS:-.whl}"
SITE="${DZAD_SITE:-/tmp/dzad-site}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=true

missing() {
  "$PY" - <<'PYEOF'
import importlib.util

NEEDED = ("torch", "torchvision", "diffusers", "accelerate", "safetensors", "transformers",
          "tokenizers", "huggingface_hub", "numpy", "scipy", "sklearn", "pandas", "PIL", "yaml",
          "tqdm", "matplotlib")
print(" ".join(m for m in NEEDED if importlib.util.find_spec(m) is None))
PYEOF
}

before="$(missing)"
rc=0
if [ -n "$before" ]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >&2 || rc=$?
  else
    rc=3
  fi
fi
after="$(missing)"
printf '{"phase": "install", "missing_before": "%s", "missing_after": "%s", "wheels": "%s", "rc": %d}\n' \
  "$before" "$after" "$WHEELS" "$rc"
if [ -n "$after" ]; then
  echo "error: still missing: $after (put their wheels in $WHEELS: docs/gpu.md)" >&2
  exit 3
fi
exec timeout 900 "$PY" -m benchmarks.gpu --check "$@"
