#!/bin/sh
# Run a pytest-vmfixtures suite once per guest image, on any Linux runner (with KVM, or without it
# under TCG). Plain POSIX shell, for CI systems without a recipe of their own.
#
#   examples/ci/run-tests.sh [extra pytest arguments]
#
# Settings, from the environment:
#   VM_IMAGES   images to run the suite on, separated by spaces   (default: debian-12)
#   VM_ACCEL    auto, kvm or tcg                                   (default: auto)
#   VMFX_CACHE  images and saved guest states; keep it between runs (default: ~/.cache/pytest-vmfixtures)
#   VENV        the virtualenv to create or reuse                  (default: .venv)
#   REPORTS     JUnit files, HTML reports, evidence of failed tests (default: reports)
#   IMAGES_DIR  your own recipes, used when the directory exists   (default: images)
#
# The host needs QEMU and the image tools; on Debian or Ubuntu, as root:
#   apt-get install qemu-system-x86 qemu-utils mmdebstrap genext2fs e2fsprogs uidmap \
#       debian-archive-keyring ovmf python3-venv
# Exit status: 0 when every image passed, 1 when any failed (or collected no tests), 2 on a setup error.
set -eu

VM_IMAGES=${VM_IMAGES:-debian-12}
VM_ACCEL=${VM_ACCEL:-auto}
VMFX_CACHE=${VMFX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pytest-vmfixtures}
VENV=${VENV:-.venv}
REPORTS=${REPORTS:-reports}
IMAGES_DIR=${IMAGES_DIR:-images}

missing=""
for tool in python3 qemu-system-x86_64 qemu-img setpriv; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    echo "run-tests.sh: missing on this host:$missing (see the comment at the top of this script)" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/pytest-vmfixtures" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # Add what your tests import (-r requirements-test.txt, -e .) to this line.
    "$VENV/bin/pip" install --quiet 'pytest-vmfixtures[html]'
fi

own_recipes=""
if [ -d "$IMAGES_DIR" ]; then
    own_recipes=yes
fi

# One line per check, and a non-zero status when something an image needs is missing (what only
# other images need is listed, not required).
for image in $VM_IMAGES; do
    "$VENV/bin/pytest-vmfixtures" doctor --cache "$VMFX_CACHE" --accel "$VM_ACCEL" \
        ${own_recipes:+--images-dir "$IMAGES_DIR"} --image "$image" || exit 2
done

mkdir -p "$REPORTS"
status=0
for image in $VM_IMAGES; do
    label=$(printf '%s' "$image" | tr -c 'A-Za-z0-9._-' '_')
    echo "== $image"
    # Options with "=": a separate word naming a directory could become pytest's rootdir.
    if ! "$VENV/bin/pytest" -ra \
        --vm-image="$image" \
        ${own_recipes:+--vm-images-dir="$IMAGES_DIR"} \
        --vm-cache="$VMFX_CACHE" \
        --vm-accel="$VM_ACCEL" \
        --vm-artifacts="$REPORTS/vm-artifacts" \
        --junitxml="$REPORTS/junit-$label.xml" \
        --html="$REPORTS/report-$label.html" --self-contained-html \
        -o junit_logging=system-out \
        "$@"; then
        status=1
        echo "== $image: failed; see $REPORTS/report-$label.html (evidence in $REPORTS/vm-artifacts)" >&2
    fi
done

"$VENV/bin/pytest-vmfixtures" images list --cache "$VMFX_CACHE" ${own_recipes:+--images-dir "$IMAGES_DIR"}
exit "$status"
