#!/usr/bin/env bash
# Quick passes of the Python tests on the two ends of the versions lanton supports, each in a venv
# of its own, with the library cargo built (scripts/setup.sh) bundled as the package does:
#
#   oldest  the lower bounds pyproject declares (requirements-oldest.txt), Python 3.11, .venv-oldjax:
#           the fused path against the reference, error messages and library loading
#   newest  the newest jax/jaxlib/optax/flax/equinox on the package index (requirements-newest.txt)
#           on the newest Python this machine has (3.12 or newer; NEWEST_PYTHON names one), .venv-newjax:
#           the reference, integration, loading, error, optax-conformance and README recipe tests,
#           and the multi-device cases closest to jax's sharding API
#
# usage: scripts/test_versions.sh {oldest|newest} [prepare|run]
#   prepare: create the venv and install the pinned versions (no library needed: scripts/test.sh
#            runs it while cargo compiles); run: install the package and test; neither: both.
# With no Python 3.12+ on the machine the newest pass says so and is skipped, unless
# LANTON_REQUIRE_NEWEST=1 (CI), which makes it an error.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: scripts/test_versions.sh oldest|newest [prepare|run]" >&2; exit 2; }
WHICH=${1:-}
STAGE=${2:-all}
case "$STAGE" in prepare | run | all) ;; *) usage ;; esac

newest_python() {
    [ -n "${NEWEST_PYTHON:-}" ] && { echo "$NEWEST_PYTHON"; return; }
    local v c
    for v in 3.14 3.13 3.12; do
        for c in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/"python$v"; do
            if command -v "$c" >/dev/null 2>&1 && "$c" -c "" >/dev/null 2>&1; then
                command -v "$c"
                return
            fi
        done
    done
}

case "$WHICH" in
    oldest)
        PY=${PYTHON:-python3}
        VENV=.venv-oldjax
        REQ=requirements-oldest.txt
        TESTS=(tests/python/test_against_reference.py tests/python/test_errors.py tests/python/test_loading.py)
        ;;
    newest)
        PY=$(newest_python)
        if [ -z "$PY" ]; then
            msg="no Python 3.12 or newer on this machine (NEWEST_PYTHON=... names one)"
            [ "${LANTON_REQUIRE_NEWEST:-0}" = 1 ] && { echo "newest-versions pass: $msg" >&2; exit 1; }
            echo "newest-versions pass skipped: $msg"
            exit 0
        fi
        VENV=.venv-newjax
        REQ=requirements-newest.txt
        # Multi-device: the layouts that lean most on jax's sharding API (explicit axes, a 2-D mesh,
        # also across two processes), the user's shard_map and the in-place path; the main run has all.
        md=tests/python/test_multidevice.py
        export LANTON_MULTIDEVICE_CASES=fsdp_explicit,2d
        TESTS=(tests/python/test_against_reference.py tests/python/test_integration.py tests/python/test_loading.py
               tests/python/test_errors.py tests/python/test_optax_conformance.py tests/python/test_recipes.py
               "$md::test_eight_virtual_devices_match_one_device" "$md::test_two_processes_with_jax_distributed_match_one_device"
               "$md::test_fused_divides_the_work_and_two_meshes_are_refused" "$md::test_inside_the_users_shard_map")
        ;;
    *) usage ;;
esac

if [ "$STAGE" != run ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
fi
[ "$STAGE" = prepare ] && exit 0

# The package itself, bundling the library setup.sh installed into .venv (the file cargo reported),
# without running cargo again; pip keeps the pinned versions if they satisfy pyproject's ranges,
# else the check below fails.
LIB=$(.venv/bin/python -c "import lanton; print(lanton.library_info()['path'])")
# copied, then renamed into place: a running process may have the old file mapped
cp "$LIB" jax_bindings/lanton/_lib/.liblanton.so.tmp
mv -f jax_bindings/lanton/_lib/.liblanton.so.tmp jax_bindings/lanton/_lib/liblanton.so
LANTON_SKIP_CARGO=1 "$VENV/bin/python" -m pip install -q ./jax_bindings
REQ="$REQ" "$VENV/bin/python" - <<'PYEOF'
import os, re, sys, importlib.metadata as md
pins = dict(re.fullmatch(r"([\w-]+)==(\S+)", l.split("#")[0].strip()).groups()
            for l in open(os.environ["REQ"]) if "==" in l.split("#")[0])
have = {p: md.version(p) for p in pins}
assert have == pins, f"{have} != {pins}"
import lanton
print(f"{os.environ['REQ']}: Python {sys.version.split()[0]},", ", ".join(f"{p} {v}" for p, v in have.items()),
      "| lanton", lanton.library_info())
PYEOF
workers=()
"$VENV/bin/python" -c "import xdist" 2>/dev/null && workers=(-n "${LANTON_TEST_WORKERS:-2}")
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${workers[@]}" --dist load --maxschedchunk 2 "${TESTS[@]}"
