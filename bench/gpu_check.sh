#!/usr/bin/env bash
# The GPU check of issue 21, in one command: every CUDA path on a real GPU, measured.
#
#   bash bench/gpu_check.sh            # on the lent GPU machine (the device tool's `run`)
#   bash bench/gpu_check.sh --smoke    # here: tiny sizes under Numba's CUDA simulator
#
# Phases, in order of importance, each in its own process under its own `timeout`, so that
# one hang or crash cannot eat the lease and the next phase still runs:
#   versions  GPU, driver, CUDA runtime, libraries; a probe kernel; the launch counter
#   tests     pytest -m "cudasim or gpu" over tests/ on the device (junit XML)
#   sweep     fastrms bench: rmsprop, adam, adagrad at n = 1e6, 1e7, 1e8, fastrms cuda vs
#             torch foreach and fused on CUDA, the same-pattern CUDA ceiling, a D2D copy
#   models    MLP, ResNet-50, GPT-2 small: grouped launch vs torch fused/foreach on CUDA,
#             kernel launches per (dtype, device) group counted
#   precision bf16 state, bf16 params, int8 state on GPT-2 small vs torch fused f32/bf16
#   torch-loop  fastrms.torch vs torch.optim in a CUDA training loop
# then a summary table (printed last). Everything lands in $OUT (8 files at most):
# versions.json sweep.json models.json precision.json torch_loop.json tests.xml summary.json
# gpu_check.log. The whole run is held under TOTAL_S (default 450 s, inside the device
# tool's 600-s command limit); a phase gets min(its own limit, what is left). --smoke
# triples every limit.
#
# Environment: OUT (default: a new temporary folder), PYTHON (default python3), TOTAL_S,
# SWEEP_SIZES (default 1e6,1e7,1e8), ONLY (phases to run, e.g. ONLY="sweep models" for a
# second call with the minutes left; default all). Options: --smoke; --no-install (use the
# fastrms that PYTHON already imports).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SMOKE=0
INSTALL=1
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1; INSTALL=0 ;;
        --no-install) INSTALL=0 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (use --smoke, --no-install)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
# The phases run in a folder of their own: a relative path to the interpreter must be made whole.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
# The simulator's speed is not the point of a smoke run: it gets three times the limits.
if [ "$SMOKE" = 1 ]; then SCALE=3; else SCALE=1; fi
TOTAL_S="${TOTAL_S:-$(( 450 * SCALE ))}"
case "$TOTAL_S" in ''|*[!0-9]*) echo "gpu_check.sh: TOTAL_S must be seconds, got $TOTAL_S" >&2; exit 2 ;; esac
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"              # the phases' status log and the install; not sent back
STATUS="$WORK/status.tsv"
LOG="$OUT/gpu_check.log"
: >"$STATUS"
: >"$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Open MPI refuses to run as root without these (the device machine runs commands as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [ "$SMOKE" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1
    SMOKE_FLAG=(--smoke)
    SIZES=256
    REPEAT=1
    ALLOW=(--allow-simulator)
else
    SMOKE_FLAG=()
    SIZES="${SWEEP_SIZES:-1e6,1e7,1e8}"
    REPEAT=5
    ALLOW=()
fi

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# Python runs outside the tree, so that `import fastrms` finds the installed package (whose
# fastrms.kernels comes from kernels/), not the source folder fastrms/ without it.
RUNDIR="$WORK/run"
mkdir -p "$RUNDIR"

install() {
    if [ "$INSTALL" = 0 ]; then
        log "install: skipped; using the fastrms that $PYTHON imports"
        return 0
    fi
    local site="$WORK/site"
    # No index and no build isolation: the image has setuptools, and nothing can be fetched.
    if (cd "$REPO" && "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index \
            --target "$site" .) >>"$LOG" 2>&1; then
        log "install: pip installed fastrms into $site"
    else
        # The same layout by hand: fastrms/ with kernels/ as fastrms/kernels (pyproject's
        # package-dir), for an image whose setuptools cannot build it.
        log "install: pip failed (see the log above); copying the package instead"
        rm -rf "$site" && mkdir -p "$site"
        cp -r "$REPO/fastrms" "$site/fastrms" && cp -r "$REPO/kernels" "$site/fastrms/kernels"
    fi
    # The copy in the tree (rebuilt by pip's build) would otherwise carry stale build files.
    rm -rf "$REPO/build"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

# phase NAME LIMIT_S COMMAND...: run COMMAND in $RUNDIR under timeout, log its output, record
# its status; skip it when less than 10 s of the total is left.
phase() {
    local name="$1" limit=$(( $2 * SCALE ))
    shift 2
    if ! wanted "$name"; then
        log "$name: not asked for (ONLY=$ONLY)"
        return
    fi
    local left=$(( TOTAL_S - ($(date +%s) - START) - 15 ))   # 15 s kept for the summary
    if [ "$left" -lt 10 ]; then
        log "$name: skipped, ${left}s left"
        printf '%s\tskip\t0\t%s\n' "$name" "$limit" >>"$STATUS"
        return
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    log "$name: start (limit ${limit}s)"
    local t0=$SECONDS rc=0
    # SIGINT first: pytest then still reports what ran (and writes its junit XML), and the
    # Python phases have saved what they measured; SIGKILL 10 s later if that hangs too.
    (cd "$RUNDIR" && timeout -s INT -k 10 "$limit" "$@") >>"$LOG" 2>&1 || rc=$?
    log "$name: exit $rc after $(( SECONDS - t0 ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$limit" >>"$STATUS"
}

# The Python phases: python -m fastrms.tools.bench.gpu PHASE "${GPU_ARGS[@]}".
GPU=("$PYTHON" -m fastrms.tools.bench.gpu)
GPU_ARGS=(--out "$OUT" --repo "$REPO" "${SMOKE_FLAG[@]}")

log "repo $REPO, out $OUT, python $PYTHON, smoke $SMOKE, total ${TOTAL_S}s"
install

phase versions 40 "${GPU[@]}" versions "${GPU_ARGS[@]}"

if [ "$SMOKE" = 1 ]; then
    # The simulator runs the CUDA tests slowly (CI runs them); here: that they collect.
    phase tests 60 "$PYTHON" -m pytest --collect-only -q -m "cudasim or gpu" -p no:cacheprovider \
        --rootdir "$REPO" -c "$REPO/pyproject.toml" --junitxml "$OUT/tests.xml" "$REPO/tests"
else
    # Every test, failing or not (issue 21 asks what fails); a module that fails to import
    # costs its own tests, not the phase.
    # (Not the smoke run of this script, which runs the simulator for a minute.) One line per
    # test in the log; with pytest-timeout (in the image), no test may hang the phase.
    PER_TEST=()
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 60)
    phase tests 110 "$PYTHON" -m pytest -v -m "cudasim or gpu" -p no:cacheprovider "${PER_TEST[@]}" \
        --continue-on-collection-errors --rootdir "$REPO" -c "$REPO/pyproject.toml" \
        -k "not test_smoke_run_writes_every_phase" \
        --junitxml "$OUT/tests.xml" "$REPO/tests"
fi

# One `fastrms bench` per algorithm (it writes its JSON at the end: a sweep stopped at its
# limit keeps the algorithms done), merged into sweep.json.
PARTS="$WORK/sweep"
mkdir -p "$PARTS"
phase sweep 140 bash -c 'for algo in rmsprop adam adagrad; do
        "$0" -m fastrms bench --algo "$algo" --sizes "$1" --model none --repeat "$2" \
            --backends cuda,torch-cuda-foreach,torch-cuda-fused --json "$3/sweep-$algo.json" \
            ${4:+"$4"} || exit
    done' "$PYTHON" "$SIZES" "$REPEAT" "$PARTS" "${ALLOW[@]}"
wanted sweep && (cd "$RUNDIR" &&
    timeout -k 5 30 "${GPU[@]}" merge-sweep "${GPU_ARGS[@]}" --parts "$PARTS") >>"$LOG" 2>&1

phase models 70 "${GPU[@]}" models "${GPU_ARGS[@]}" --repeat "$REPEAT"
phase precision 55 "${GPU[@]}" precision "${GPU_ARGS[@]}" --repeat "$REPEAT"
phase torch-loop 35 "${GPU[@]}" torch-loop "${GPU_ARGS[@]}" --repeat "$REPEAT"

# The summary: status, seconds and key figures per phase, printed last (the device tool's
# reply carries the end of the output).
(cd "$RUNDIR" && timeout -k 5 30 "${GPU[@]}" summary "${GPU_ARGS[@]}" --status "$STATUS") \
    2>>"$LOG" | tee -a "$LOG"
log "done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG" >&2
# Exit 1 if a phase failed or was stopped (the summary above says which), 0 if all ran.
failed=$(awk -F'\t' '$2 != "0" && $2 != "skip"' "$STATUS" | wc -l)
rm -rf "$WORK"
[ "$failed" -eq 0 ]
