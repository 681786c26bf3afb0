#!/usr/bin/env bash
# Installs what building and testing sockmap-gc needs on Debian, and mounts the BPF
# filesystem if absent. Idempotent; run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (BPF programs, cgroups and network namespaces need it)" >&2
  exit 2
fi

# podman with runc (crun refuses a hybrid cgroup layout) and debootstrap: the container image's
# test (scripts/image.sh); python3-yaml: the tests that read deploy/.
packages=(clang llvm libelf-dev zlib1g-dev pkg-config bpftool iproute2 libbpf-dev linux-libc-dev prometheus systemd groff-base python3-venv binutils time runc podman debootstrap python3-yaml)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  echo "setup.sh: mounting the BPF filesystem at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

if ! grep -qs ' cgroup2 ' /proc/mounts; then
  echo "setup.sh: no cgroup v2 hierarchy is mounted; the lab needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)" >&2
  exit 2
fi

command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install Rust (rustup) first" >&2; exit 2; }
