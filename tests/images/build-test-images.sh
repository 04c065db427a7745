#!/usr/bin/env bash
# Builds the OCI/Docker test images (see README.md next to this script) into
# ${ISOCELL_CACHE:-~/.cache/isocell}/test-images/KEY/ and prints that directory. KEY is the first
# 16 hex digits of the SHA-256 of this script and probe.c; a directory that exists is complete
# (it is built in a temporary directory beside it and renamed into place), so a second run only
# prints it. Concurrent runs wait for each other (flock).
#
# Needs: mmdebstrap (and network access to deb.debian.org, or ISOCELL_DEBIAN_MIRROR), gcc with a
# static libc, skopeo, GNU tar, gzip, sha256sum: scripts/install-deps.sh installs them.
#
# KEY does not cover the Debian archive: a build after a bookworm point release has newer
# packages, so other digests. Everything else is fixed (SOURCE_DATE_EPOCH, sorted tar members,
# numeric owners, gzip -n): two builds against one archive state give identical files.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ISOCELL_CACHE:-$HOME/.cache/isocell}/test-images
mirror=${ISOCELL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# 2024-01-01T00:00:00Z: every timestamp in the images.
export SOURCE_DATE_EPOCH=1704067200
created=2024-01-01T00:00:00Z

key=$(cat "$0" "$here/probe.c" | sha256sum | cut -c1-16)
out="$cache/$key"
if [[ -d "$out" ]]; then
  echo "$out"
  exit 0
fi

for tool in mmdebstrap gcc skopeo tar gzip sha256sum flock; do
  command -v "$tool" >/dev/null || {
    echo "isocell: $tool is missing; run scripts/install-deps.sh" >&2
    exit 1
  }
done

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [[ -d "$out" ]]; then # built by a concurrent run while this one waited
  echo "$out"
  exit 0
fi

# Builds of any key hold the lock while they run: a build directory found now was left by one
# that was killed outright.
rm -rf --one-file-system "$cache"/.build-*

echo "isocell: building the test images (key $key)" >&2
started=$SECONDS
stage=$(mktemp -d "$cache/.build-$key.XXXXXX")
# --one-file-system: never descend into anything mounted below it.
trap 'rm -rf --one-file-system "$stage"' EXIT
work="$stage/work"
mkdir -p "$work"

# Tar options that make a layer depend on its content only.
tar_opts=(--sort=name --numeric-owner --owner=0 --group=0 --mtime="@$SOURCE_DATE_EPOCH"
  --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)

# add_blob LAYOUT FILE: moves FILE into LAYOUT's blob store; sets $digest and $size.
add_blob() {
  local sum
  sum=$(sha256sum "$2" | cut -d' ' -f1)
  digest="sha256:$sum"
  size=$(stat -c %s "$2")
  mkdir -p "$1/blobs/sha256"
  mv "$2" "$1/blobs/sha256/$sum"
}

# add_json LAYOUT TEXT: stores TEXT (compact JSON, no newline) as a blob; sets $digest and $size.
add_json() {
  printf '%s' "$2" >"$work/json"
  add_blob "$1" "$work/json"
}

# add_layer LAYOUT TAR: stores TAR gzipped as a layer; sets $diff_id, $digest and $size.
add_layer() {
  diff_id="sha256:$(sha256sum "$2" | cut -d' ' -f1)"
  gzip -n -6 <"$2" >"$2.gz"
  rm -f "$2"
  add_blob "$1" "$2.gz"
}

# json_strings A B ...: a JSON list of strings (the values here need no escaping).
json_strings() {
  local IFS=,
  local quoted=()
  local s
  for s in "$@"; do quoted+=("\"$s\""); done
  printf '[%s]' "${quoted[*]}"
}

# descriptor MEDIA_TYPE: a descriptor of the last blob added.
descriptor() {
  printf '{"mediaType":"%s","digest":"%s","size":%s}' "$1" "$digest" "$size"
}

# image LAYOUT CONFIG LAYERS DIFF_IDS: writes the config and the manifest of an image whose
# layers (descriptors, comma-separated) are already stored; sets $manifest to the manifest's
# descriptor (without annotations).
image() {
  local layout=$1 config=$2 layers=$3 diff_ids=$4
  add_json "$layout" "{\"created\":\"$created\",\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":$config,\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[$diff_ids]}}"
  local config_desc
  config_desc=$(descriptor application/vnd.oci.image.config.v1+json)
  add_json "$layout" "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":$config_desc,\"layers\":[$layers]}"
  manifest="\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$digest\",\"size\":$size"
}

# finish_layout LAYOUT "TAG=MANIFEST" ...: writes oci-layout and index.json.
finish_layout() {
  local layout=$1
  shift
  local entries=() entry
  for entry in "$@"; do
    entries+=("{${entry#*=},\"annotations\":{\"org.opencontainers.image.ref.name\":\"${entry%%=*}\"}}")
  done
  local IFS=,
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' \
    "${entries[*]}" >"$layout/index.json"
}

gzip_layer=application/vnd.oci.image.layer.v1.tar+gzip

# ---- python: Debian 12 with python3, two layers ----
python="$stage/python"
mkdir -p "$python"
# Layer 1: the root from mmdebstrap, merged-/usr made by mmdebstrap's hook rather than by the
# usrmerge package (which would bring perl, 50 MB). /dev is left out of its tarball (the runtime
# provides it) and appended as an empty directory. The hostname and resolver files copied from
# the host are dropped; the runtime provides those too.
mmdebstrap --variant=essential --include=python3-minimal \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --skip=output/dev \
  --customize-hook='rm -f "$1/etc/hostname" "$1/etc/resolv.conf"' \
  --customize-hook='echo "app:x:1000:1000:app:/home/app:/bin/sh" >>"$1/etc/passwd"' \
  --customize-hook='echo "app:*:19723:0:99999:7:::" >>"$1/etc/shadow"' \
  --customize-hook='printf "app:x:1000:\nstaff2:x:2000:app\n" >>"$1/etc/group"' \
  --customize-hook='printf "app:!::\nstaff2:!::app\n" >>"$1/etc/gshadow"' \
  --customize-hook='install -d -o 1000 -g 1000 -m 0755 "$1/home/app" "$1/srv/work"' \
  --customize-hook='install -d -m 0755 "$1/etc/isocell-opaque"' \
  --customize-hook='echo layer1 >"$1/etc/isocell-opaque/from-layer1"' \
  bookworm "$work/layer1.tar" "deb $mirror bookworm main" >&2
mkdir -m 0755 "$work/devroot" "$work/devroot/dev"
tar "${tar_opts[@]}" -C "$work/devroot" -rf "$work/layer1.tar" ./dev
python_uncompressed=$(stat -c %s "$work/layer1.tar")
add_layer "$python" "$work/layer1.tar"
layers=$(descriptor $gzip_layer)
diff_ids="\"$diff_id\""

# Layer 2: a new file, a whiteout and an opaque directory.
#   /etc/isocell-test                          added ("layer2\n")
#   /etc/.wh.debian_version                    deletes /etc/debian_version (nothing reads it)
#   /etc/isocell-opaque/.wh..wh..opq           hides layer 1's /etc/isocell-opaque/from-layer1
#   /etc/isocell-opaque/from-layer2            added ("layer2\n")
l2="$work/layer2"
mkdir -p -m 0755 "$l2/etc/isocell-opaque"
echo layer2 >"$l2/etc/isocell-test"
echo layer2 >"$l2/etc/isocell-opaque/from-layer2"
: >"$l2/etc/.wh.debian_version"
: >"$l2/etc/isocell-opaque/.wh..wh..opq"
chmod 0644 "$l2/etc/isocell-test" "$l2/etc/isocell-opaque/from-layer2" \
  "$l2/etc/.wh.debian_version" "$l2/etc/isocell-opaque/.wh..wh..opq"
tar "${tar_opts[@]}" -C "$l2" -cf "$work/layer2.tar" etc
python_uncompressed=$((python_uncompressed + $(stat -c %s "$work/layer2.tar")))
add_layer "$python" "$work/layer2.tar"
layers+=",$(descriptor $gzip_layer)"
diff_ids+=",\"$diff_id\""

image "$python" "{\"Env\":$(json_strings "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "LANG=C.UTF-8"),\"Cmd\":[\"python3\"],\"WorkingDir\":\"/srv/work\"}" \
  "$layers" "$diff_ids"
finish_layout "$python" "latest=$manifest"

# The same image as an OCI archive and as a `docker save` archive. skopeo stamps the OCI
# archive's members with the current time: they are packed again with fixed ones.
skopeo --insecure-policy copy --quiet "oci:$python:latest" "oci-archive:$work/oci-archive.tar:latest" >&2
mkdir "$work/oci-archive"
tar -C "$work/oci-archive" -xf "$work/oci-archive.tar"
tar "${tar_opts[@]}" -C "$work/oci-archive" -cf "$stage/python.oci-archive.tar" oci-layout index.json blobs
rm -rf "$work/oci-archive" "$work/oci-archive.tar"
skopeo --insecure-policy copy --quiet "oci:$python:latest" \
  "docker-archive:$stage/python.docker-archive.tar:isocell-test/python:latest" >&2

# ---- scratch: one static binary, no shell ----
scratch="$stage/scratch"
mkdir -p "$scratch" "$work/scratchroot"
gcc -static -O2 -s -Wall -Wextra -Werror -o "$work/scratchroot/probe" "$here/probe.c"
chmod 0755 "$work/scratchroot" "$work/scratchroot/probe"
tar "${tar_opts[@]}" -C "$work/scratchroot" -cf "$work/scratch.tar" probe
scratch_uncompressed=$(stat -c %s "$work/scratch.tar")
add_layer "$scratch" "$work/scratch.tar"
layers=$(descriptor $gzip_layer)
scratch_config="\"Entrypoint\":[\"/probe\"],\"Cmd\":[\"from-cmd\"],\"Env\":$(json_strings PATH=/usr/bin:/bin FOO=from-image),\"WorkingDir\":\"/data\""
image "$scratch" "{$scratch_config}" "$layers" "\"$diff_id\""
latest=$manifest
image "$scratch" "{\"User\":\"1000:2000\",$scratch_config}" "$layers" "\"$diff_id\""
finish_layout "$scratch" "latest=$latest" "user=$manifest"

rm -rf "$work"
chmod 0755 "$stage"
{
  echo "key=$key"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$((SECONDS - started))"
  echo "python uncompressed=$python_uncompressed compressed=$(du -sb "$python/blobs" | cut -f1)"
  echo "scratch uncompressed=$scratch_uncompressed compressed=$(du -sb "$scratch/blobs" | cut -f1)"
} >"$stage/BUILD-INFO"
mv -T "$stage" "$out"
trap - EXIT
echo "isocell: built the test images in $((SECONDS - started)) s: $out" >&2
echo "$out"
