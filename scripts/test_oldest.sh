#!/usr/bin/env bash
# Quick pass of the Python tests on the oldest versions the package declares (requirements-oldest.txt)
# in .venv-oldjax: the fused path against the reference, error messages and library loading.
# Needs the library built (scripts/setup.sh). scripts/test.sh runs it before the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-oldjax
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements-oldest.txt
# The package itself, bundling the library cargo built (as setup.py would, without running cargo
# again); pip keeps the pinned versions if they satisfy pyproject's ranges, else the check fails.
LIB=target/release/liblanton.so
[ -f "$LIB" ] || { echo "$LIB not built: run scripts/setup.sh (or cargo build --release) first" >&2; exit 1; }
# copied, then renamed into place: a running process may have the old file mapped
cp "$LIB" jax_bindings/lanton/_lib/.liblanton.so.tmp
mv -f jax_bindings/lanton/_lib/.liblanton.so.tmp jax_bindings/lanton/_lib/liblanton.so
LANTON_SKIP_CARGO=1 "$VENV/bin/python" -m pip install -q ./jax_bindings
"$VENV/bin/python" - <<'PYEOF'
import re, importlib.metadata as md
pins = dict(re.fullmatch(r"([\w-]+)==(\S+)", l.split("#")[0].strip()).groups()
            for l in open("requirements-oldest.txt") if "==" in l.split("#")[0])
have = {p: md.version(p) for p in pins}
assert have == pins, f"{have} != {pins}"
import lanton
print("oldest versions:", ", ".join(f"{p} {v}" for p, v in have.items()), "| lanton", lanton.library_info())
PYEOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/python/test_against_reference.py tests/python/test_errors.py tests/python/test_loading.py
