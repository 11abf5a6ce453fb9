#!/usr/bin/env bash
# skein:latest from the host's (debug) binaries: CI has no registry to pull
# the Rust or Debian base images of docker/Dockerfile from, so the image is
# `FROM scratch` (docker/Dockerfile.local) with the binaries, the libraries
# they link, a shell and install(1).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked -p skein-node --bin skeind -p skein-ctl --bin skeinctl \
    -p skein-bench --bin skein-sink --bin skein-mail
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs/usr/local/bin" "$stage/queue"
chmod 0700 "$stage/queue"
for b in skeind skeinctl skein-sink skein-mail; do
    objcopy --strip-debug "target/debug/$b" "$stage/rootfs/usr/local/bin/$b"
done
# A shell and install(1), which the compose file's `secrets` service uses
# (the user image, on Debian, has them).
mkdir -p "$stage/rootfs/bin"
cp -L /bin/sh "$stage/rootfs/bin/sh"
cp -L "$(command -v install)" "$stage/rootfs/bin/install"
# The shared libraries they link, at the paths the loader looks for them.
for lib in $(ldd "$stage"/rootfs/usr/local/bin/* "$stage"/rootfs/bin/* | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
    mkdir -p "$stage/rootfs$(dirname "$lib")"
    cp -L "$lib" "$stage/rootfs$lib"
done
mkdir -p "$stage/rootfs/etc/skein"
printf 'root:x:0:0::/:/nonexistent\nskein:x:10001:10001::/var/lib/skein:/nonexistent\n' > "$stage/rootfs/etc/passwd"
printf 'root:x:0:\nskein:x:10001:\n' > "$stage/rootfs/etc/group"
docker build -q -t skein:latest -f docker/Dockerfile.local "$stage" >/dev/null
