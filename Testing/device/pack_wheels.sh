#!/usr/bin/env bash
# Pack what the lent GPU machine lacks for Testing/device/device_check.sh (run HERE, on the
# development machine, from the repository root, before the `run` call; about 2 minutes).
#
# The device machine has torch, numpy, scipy and pytest but no SimpleITK, nibabel or nilearn
# (the MNI152 templates the simulator reads ship inside the nilearn wheel), and it cannot
# download anything. The wheels for its Python 3.12 (x86-64) are fetched here at the versions of
# .venv; SimpleITK's wheel alone is 53 MB, over what may travel next to the repository
# (64 MiB in all), so the wheels are unpacked and re-compressed with xz into one archive,
# ${DEVICE_WHEELS:-.whl}/site.tar.xz (about 40 MB), that device_check.sh extracts to /tmp/site.
# `.whl/` is git-ignored; name it in the run call's carry list: carry=[".whl"].
set -euo pipefail
W=${DEVICE_WHEELS:-.whl}
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

pins=$("$PY" -c "from importlib.metadata import version as v
print(' '.join(f'{n}=={v(n)}' for n in ('SimpleITK', 'nibabel', 'nilearn')))")
echo "packing for the device (cp312, manylinux x86-64): $pins"
# shellcheck disable=SC2086  # $pins is a list of requirements
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$TMP/wheels" $pins
mkdir -p "$TMP/site" "$W"
for whl in "$TMP"/wheels/*.whl; do  # a wheel unzipped is its installed form (no scripts needed)
    "$PY" -m zipfile -e "$whl" "$TMP/site"
done
tar -C "$TMP/site" -cf - . | xz -T2 -6 > "$W/site.tar.xz.part"
mv "$W/site.tar.xz.part" "$W/site.tar.xz"
ls -l "$W"/site.tar.xz
