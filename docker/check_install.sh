#!/usr/bin/env bash
# The Dockerfile's RUN line, run verbatim in a venv that stands in for an NGC PyTorch image: a torch
# of the host's venv is linked in (never reinstalled), packaging is an old pinned version, and
# PIP_CONSTRAINT points to a constraint file that pins them, as NGC images since 25.03 do.
#
#   bash docker/check_install.sh [GIT_REF]   # GIT_REF: take the Dockerfile from that commit instead
#
# Passes when the install succeeds, torch is the one linked in, packaging satisfies megatron-core
# (>= 24.2) and the image's constraint file keeps pinning torch. Needs PyPI; about 1-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC_PY=${SRC_PY:-.venv/bin/python}  # a venv with torch installed (the host's)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
site_of() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
SRC_SITE=$(site_of "$SRC_PY")
python3 -m venv "$WORK/venv"
SITE=$(site_of "$WORK/venv/bin/python")
for entry in "$SRC_SITE"/torch "$SRC_SITE"/torchgen "$SRC_SITE"/functorch "$SRC_SITE"/torch-*.dist-info \
             "$SRC_SITE"/numpy "$SRC_SITE"/numpy-*.dist-info "$SRC_SITE"/numpy.libs; do
  [ -e "$entry" ] && ln -s "$entry" "$SITE/"
done
"$WORK/venv/bin/python" -m pip install -q packaging==23.2
TORCH=$("$WORK/venv/bin/python" -m pip list --format=freeze | grep -i '^torch==')
NUMPY=$("$WORK/venv/bin/python" -m pip list --format=freeze | grep -i '^numpy==')
mkdir -p "$WORK/etc/pip"
printf '%s\n' "$TORCH" "$NUMPY" "packaging==23.2" > "$WORK/etc/pip/constraint.txt"
echo "image-like constraints:"; cat "$WORK/etc/pip/constraint.txt"
mkdir "$WORK/src"
git ls-files -z | xargs -0 cp --parents -t "$WORK/src"
if [ -n "${1:-}" ]; then git show "$1:docker/Dockerfile" > "$WORK/src/docker/Dockerfile"; fi
RUN_LINE=$(python3 - "$WORK/src/docker/Dockerfile" <<'PY'
import sys
lines, out, inside = open(sys.argv[1]).read().splitlines(), [], False
for line in lines:
    if line.startswith("RUN "):
        inside, line = True, line[4:]
    if inside:  # docker joins continuation lines: drop the backslash and the newline
        out.append(line.rstrip()[:-1] if line.rstrip().endswith("\\") else line)
        if not line.rstrip().endswith("\\"):
            break
print(" ".join(out))
PY
)
echo "RUN line:"; echo "$RUN_LINE"
(cd "$WORK/src" && PATH="$WORK/venv/bin:$PATH" PIP_CONSTRAINT="$WORK/etc/pip/constraint.txt" \
  PIP_DISABLE_PIP_VERSION_CHECK=1 bash -c "$RUN_LINE")
after=$("$WORK/venv/bin/python" -m pip list --format=freeze)
echo "$after" | grep -qx "$TORCH" || { echo "FAIL: torch was replaced"; exit 1; }
"$WORK/venv/bin/python" -c "import packaging, sys; from packaging.version import Version; \
sys.exit(Version(packaging.__version__) < Version('24.2'))" || { echo "FAIL: packaging < 24.2"; exit 1; }
grep -qx "$TORCH" "$WORK/etc/pip/constraint.txt" || { echo "FAIL: constraint file lost torch"; exit 1; }
! grep -qi '^packaging==' "$WORK/etc/pip/constraint.txt" || { echo "FAIL: packaging still pinned"; exit 1; }
echo "OK: installed under an image-like PIP_CONSTRAINT; $TORCH kept; constraint file now:"
cat "$WORK/etc/pip/constraint.txt"
