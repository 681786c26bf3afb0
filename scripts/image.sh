#!/usr/bin/env bash
# Builds the container image from the Containerfile with podman and prints its name on the last
# line (and its size before it). Steps:
#   1. the Debian package, with scripts/package.sh (the release build is incremental);
#   2. a local Debian bookworm base, for machines without a registry (CI): debootstrap
#      --variant=minbase from the Debian mirror apt here uses, trimmed as debian:bookworm-slim
#      is (no docs, man pages, locales, apt lists or cached debs), imported as
#      localhost/sockmap-gc-base:bookworm. Cached as a tarball under target/image/ and in
#      podman's store, so it is made once per machine (SMGC_IMAGE_BASE_REBUILD=1 remakes it);
#   3. podman build --from that base: the Containerfile's FROM stays the public
#      debian:bookworm-slim for users, who build with plain `podman build` (README, "Kubernetes").
# With SMGC_IMAGE_BASE=public the public base is pulled instead of the local one.
# Needs root (debootstrap; rootful podman) and what scripts/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "image.sh: run as root (debootstrap and rootful podman need it)" >&2
  exit 2
fi
for tool in podman runc debootstrap flock; do
  command -v "$tool" >/dev/null || { echo "image.sh: $tool is missing: run scripts/setup.sh" >&2; exit 2; }
done

target="${CARGO_TARGET_DIR:-target}"
# runc, even where crun is installed too: crun refuses a hybrid cgroup layout.
runtime=(--runtime runc)
cache="$target/image"
# Bump when make_base changes: a cached base of an older recipe is then made again.
recipe=r2
base=localhost/sockmap-gc-base:bookworm-$recipe
base_tar="$cache/bookworm-minbase-$recipe.tar"
started=$(date +%s)
say() { echo "image.sh: $* ($(( $(date +%s) - started )) s)" >&2; }

deb=$(bash scripts/package.sh | tail -n 1)
say "package $deb"
version=$(dpkg-deb -f "$deb" Version)
version=${version%-1}
arch=$(dpkg-deb -f "$deb" Architecture)

# The Debian archive apt is configured with here (the only network CI has).
mirror_of() {
  apt-get indextargets --format '$(LABEL) $(RELEASE) $(REPO_URI)' 'Identifier: Packages' \
    | awk -v label="$1" -v release="$2" '$1 == label && $2 == release { print $3; exit }'
}

make_base() {
  local mirror security root
  mirror=${SMGC_DEBIAN_MIRROR:-$(mirror_of Debian bookworm)}
  [ -n "$mirror" ] || { echo "image.sh: apt here has no Debian bookworm source; set SMGC_DEBIAN_MIRROR" >&2; exit 2; }
  security=$(mirror_of Debian-Security bookworm-security)
  root=$(mktemp -d "${TMPDIR:-/tmp}/sockmap-gc-base.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this root
  trap "rm -rf '$root'" EXIT
  say "debootstrap --variant=minbase bookworm from $mirror"
  timeout 900 debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; echo "image.sh: debootstrap failed (log: $cache/debootstrap.log)" >&2; exit 1; }
  # What debian:bookworm-slim leaves out, for this root and every package installed into it.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  # And what its apt keeps out of an image's layers: package caches, downloaded debs,
  # translations.
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/* \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log
  {
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    [ -z "$security" ] || echo "deb $security bookworm-security main"
  } >"$root/etc/apt/sources.list"
  rm -f "$cache"/bookworm-minbase-*.tar
  tar --numeric-owner --xattrs -C "$root" -cf "$base_tar.part" .
  mv "$base_tar.part" "$base_tar"
  rm -rf "$root"
  trap - EXIT
  say "base root $(du -h "$base_tar" | cut -f1)"
}

from=()
if [ "${SMGC_IMAGE_BASE:-local}" = public ]; then
  say "base: the Containerfile's public FROM"
else
  mkdir -p "$cache"
  if [ "${SMGC_IMAGE_BASE_REBUILD:-0}" = 1 ]; then
    rm -f "$base_tar"
    podman image rm --force "$base" >/dev/null 2>&1 || true
  fi
  if ! podman image exists "$base"; then
    [ -f "$base_tar" ] || make_base
    podman "${runtime[@]}" import --quiet --change 'CMD ["bash"]' "$base_tar" "$base" >/dev/null
    say "imported $base"
    # Bases of older recipes go.
    podman images --format '{{.Repository}}:{{.Tag}}' "${base%:*}" | grep -vxF "$base" \
      | xargs -r podman image rm >/dev/null 2>&1 || true
  fi
  from=(--from "$base" --pull=never)
fi

image="localhost/sockmap-gc:$version"
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
# The ulimits stay under this machine's hard limits (podman's default nproc may not); the
# build's network is the host's, so no bridge or firewall rule is set up for apt.
timeout 900 podman "${runtime[@]}" build --quiet "${from[@]}" --network host \
  --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
  --build-arg "VERSION=$version" --build-arg "ARCH=$arch" \
  -f Containerfile -t "$image" . >"$cache/build.log" 2>&1 \
  || { tail -n 30 "$cache/build.log" >&2; echo "image.sh: podman build failed (log: $cache/build.log)" >&2; exit 1; }
size=$(podman image inspect --format '{{.Size}}' "$image")
# The image this build replaced, untagged now, goes (unless a container still uses it).
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
  podman image rm "$previous" >/dev/null 2>&1 || true
fi
say "built $image, $(( size / 1024 / 1024 )) MiB ($size bytes)"
echo "$image"
