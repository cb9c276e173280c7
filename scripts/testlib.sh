# Shared by scripts/test and scripts/test-beside (sourced, not run): one pytest run, recorded.
#
# Each run writes its JUnit XML to $RESULTS/NAME.xml and one line to $RESULTS/runs.tsv (see
# scripts/runs.py, which reads them and prints the summary table at the end of scripts/test).
# VMFX_TEST_DRY="PYTEST ARGS": every run runs those arguments instead (a cheap rehearsal of scripts/test's
# own logic: rig checks, counting, verdicts and the summary), with no skip allowed.

PY=.venv/bin/python
PYTEST=".venv/bin/pytest -p no:cacheprovider"
# The guests of other CPU architectures that scripts/test-beside builds and tests.
FOREIGN_IMAGES=${VMFX_TEST_FOREIGN_IMAGES:-debian-12-arm64 debian-13-arm64 debian-13-riscv64}
# Every run of scripts/test-beside, in its order: scripts/test checks that each left a record.
BESIDE_RUNS="xdist recipes docs examples libvirt-2hosts libvirt-cloud libvirt-snapshot $(for i in $FOREIGN_IMAGES; do printf 'revert-%s ' "$i"; done)"

# record NAME STATUS ALLOWED_SKIPS COLLECTED SECONDS NOTE
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$RESULTS/runs.tsv"
}

# notrun NAME WHY: a run whose test rig could not start: a failure in CI, "not run" elsewhere.
notrun() {
    echo "scripts/test: $1 not run: $2" >&2
    record "$1" rig 0 "" 0 "$2"
}

# broken NAME WHY: a run that could not run for another reason (a failed image build): always a failure.
broken() {
    echo "scripts/test: $1 failed before its tests: $2" >&2
    record "$1" broken 0 "" 0 "$2"
}

# run NAME ALLOWED_SKIPS PYTEST-ARGS...: ALLOWED_SKIPS is how many of its tests skip by design in CI.
# The run must pass at least (collected - ALLOWED_SKIPS) tests, where collected is counted first with
# --collect-only on the same arguments.
run() {
    name=$1
    skips=$2
    shift 2
    if [ -n "${VMFX_TEST_DRY:-}" ]; then
        # shellcheck disable=SC2086
        set -- $VMFX_TEST_DRY
        skips=0
    fi
    echo "+ [$name] pytest $*"
    # shellcheck disable=SC2086
    count=$($PYTEST --collect-only -q "$@" -n 0 2>&1 | $PY scripts/runs.py collected)
    began=$(date +%s)
    # shellcheck disable=SC2086
    $PYTEST --junitxml="$RESULTS/$name.xml" "$@"
    status=$?
    record "$name" "$status" "$skips" "$count" "$(($(date +%s) - began))" ""
    return "$status"
}
