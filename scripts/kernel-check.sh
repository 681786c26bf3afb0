#!/usr/bin/env bash
# Proves sockmap-gc on another kernel: boots it under qemu (virtme-ng, over a copy-on-write
# view of this machine's root) and runs there the lab's incident demo and the integration
# tests that depend on the kernel. Prints one line per part, the facts that differ between
# kernels, and a closing "kernel-check: N passed, N failed"; exits non-zero on any failure,
# including a guest that does not boot.
#
#   scripts/kernel-check.sh                      Debian 12's newest 6.1 kernel (fetched and
#                                                cached under target/kernel-check/)
#   scripts/kernel-check.sh --kernel VMLINUZ [--modules DIR]
#                                                a kernel of your own, e.g. your nodes' exact
#                                                one; DIR is its /lib/modules/RELEASE (default:
#                                                found beside VMLINUZ, e.g. /lib/modules/RELEASE
#                                                for /boot/vmlinuz-RELEASE)
#
# Needs root, and installs what it needs (apt: qemu-system-x86; busybox-static and the kernel
# are downloaded, not installed; PyPI: virtme-ng in a venv under target/). The tests are
# built on this machine and run in the guest one at a time. Runs under emulation (TCG: no
# KVM), so it takes minutes. Environment: KERNEL_CHECK_TIMEOUT (whole guest run, default 1800 s),
# KERNEL_CHECK_BOOT_TIMEOUT (default 180 s), KERNEL_CHECK_SOAK_RATE (the soak's connections
# per second in the guest, default 100; 0 skips the soak), KERNEL_CHECK_FULL=1 (run the scale
# tests in the guest too), KERNEL_CHECK_FILTER (run only the integration tests whose names
# contain one of these space-separated words, e.g. "events::", and not the demo: a few minutes
# instead of the whole stage), KERNEL_CHECK_REPEAT (run those tests this many times, default 1;
# e.g. to gather several `kernel fact:` figures from one boot).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

kernel=""
modules=""
# Debian 12's 6.1 runs both kernel-event programs (tp_btf and fexit): the event tests fail
# there if one is refused. On a kernel of your own they say what it allows, as kernel facts.
expect_events=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=${2:?--kernel needs a path}; expect_events=0; shift 2 ;;
    --kernel=*) kernel=${1#--kernel=}; expect_events=0; shift ;;
    --modules) modules=${2:?--modules needs a directory}; shift 2 ;;
    --modules=*) modules=${1#--modules=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "kernel-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$modules" ] && [ -z "$kernel" ]; then
  echo "kernel-check: --modules goes with --kernel" >&2; exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "kernel-check: run as root (the guest runs the lab, which needs BPF and namespaces)" >&2; exit 2
fi

total_timeout=${KERNEL_CHECK_TIMEOUT:-1800}
boot_timeout=${KERNEL_CHECK_BOOT_TIMEOUT:-180}
soak_rate=${KERNEL_CHECK_SOAK_RATE:-100}
full=${KERNEL_CHECK_FULL:-0}
filter=${KERNEL_CHECK_FILTER:-}
repeat=${KERNEL_CHECK_REPEAT:-1}
case $repeat in ''|*[!0-9]*|0) echo "kernel-check: KERNEL_CHECK_REPEAT must be a positive number" >&2; exit 2 ;; esac
cache=$repo/target/kernel-check
mkdir -p "$cache"
say() { echo "kernel-check: $*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }
# The closing line on every exit that judged nothing else: one failed part.
fail() { say "FAIL: $*"; say "0 passed, 1 failed"; exit 1; }

# --- tools --------------------------------------------------------------------------------
t_tools=$(now)
bash scripts/setup.sh
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v file >/dev/null || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Downloads the newest package whose name matches $1 (an apt-cache regex) into $cache/debs
# and unpacks it under $cache/pkg/NAME; prints that directory.
fetch_deb() {
  local name
  name=$(apt-cache search --names-only "$1" | awk '{ print $1 }' | sort -V | tail -n 1)
  if [ -z "$name" ]; then
    apt-get update -qq
    name=$(apt-cache search --names-only "$1" | awk '{ print $1 }' | sort -V | tail -n 1)
  fi
  [ -n "$name" ] || { echo "kernel-check: no package matches $1 in apt's lists" >&2; return 1; }
  local dir=$cache/pkg/$name
  if [ ! -e "$dir/.unpacked" ]; then
    mkdir -p "$cache/debs" "$cache/pkg" && rm -rf "$dir"
    (cd "$cache/debs" && rm -f "${name}"_*.deb && timeout 600 apt-get download -qq -o APT::Sandbox::User=root "$name") >&2
    dpkg -x "$cache/debs/${name}"_*.deb "$dir"
    touch "$dir/.unpacked"
  fi
  echo "$dir"
}

busybox=$(fetch_deb '^busybox-static$')/bin/busybox
[ -x "$busybox" ] || fail "busybox-static unpacked without bin/busybox"
vng=$cache/venv/bin/vng
if [ ! -x "$vng" ]; then
  say "installing virtme-ng 1.42 into $cache/venv"
  rm -rf "$cache/venv"
  python3 -m venv "$cache/venv"
  timeout 600 "$cache/venv/bin/pip" install -q virtme-ng==1.42
fi

# --- the kernel ---------------------------------------------------------------------------
if [ -z "$kernel" ]; then
  kdir=$(fetch_deb '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$')
  kernel=$(ls "$kdir"/boot/vmlinuz-* | head -n 1)
  release=${kernel##*/vmlinuz-}
  [ -e "$kdir/lib/modules/$release/modules.dep" ] || depmod -b "$kdir" "$release"
  modules=$kdir/lib/modules/$release
else
  [ -r "$kernel" ] || fail "cannot read the kernel image $kernel"
  release=$(file -bL "$kernel" | sed -n 's/.*[vV]ersion \([^ ,]*\).*/\1/p')
  [ -n "$release" ] || fail "cannot read the release of $kernel (is it a bzImage?)"
  if [ -z "$modules" ]; then
    modules=$(cd "$(dirname "$kernel")/.." && pwd)/lib/modules/$release
    [ -d "$modules" ] || modules=/lib/modules/$release
  fi
  [ -d "$modules" ] || fail "no modules for $release (looked beside $kernel and in /lib/modules): \
pass --modules DIR, or use a kernel with virtio, 9p and overlayfs built in"
  # virtme-ng finds the modules at ROOT/lib/modules/RELEASE beside ROOT/boot/KERNEL: stage
  # that layout with links, and modules.dep in a copy if the directory lacks it (never
  # writing into the user's directory).
  kdir=$cache/user/$release
  rm -rf "$kdir" && mkdir -p "$kdir/boot" "$kdir/lib/modules"
  ln -s "$(readlink -f "$kernel")" "$kdir/boot/vmlinuz-$release"
  if [ -e "$modules/modules.dep" ]; then
    ln -s "$(readlink -f "$modules")" "$kdir/lib/modules/$release"
  else
    cp -r "$modules" "$kdir/lib/modules/$release"
    depmod -b "$kdir" "$release"
  fi
  kernel=$kdir/boot/vmlinuz-$release
fi
say "kernel $release ($kernel); tools ready in $(secs "$t_tools" "$(now)") s"

# --- what runs in the guest, built here ---------------------------------------------------
t_build=$(now)
cargo build --workspace --locked --quiet
it=$(cargo test -p sockmap-gc-lab --test it --no-run --locked 2>&1 |
  sed -n 's/.*Executable tests\/it\/main.rs (\(.*\))$/\1/p' | tail -n 1)
[ -n "$it" ] && [ -x "$repo/$it" ] || fail "could not build the integration test binary"
it=$repo/$it
# Tracing programs (fentry, fexit, tp_btf): a later feature builds on them; probed, not required.
probe_dir=$cache/probe
mkdir -p "$probe_dir"
for kind in fentry fexit tp_btf; do
  case $kind in
    fentry|fexit) sec="$kind/tcp_close" ;;
    tp_btf) sec="tp_btf/sched_process_exit" ;;
  esac
  printf '%s\n' '#define SEC(name) __attribute__((section(name), used))' \
    "SEC(\"$sec\") int probe(void *ctx) { return 0; }" \
    'char LICENSE[] SEC("license") = "GPL";' >"$probe_dir/$kind.bpf.c"
  clang -O2 -g -target bpf -c "$probe_dir/$kind.bpf.c" -o "$probe_dir/$kind.bpf.o"
done
say "test binaries built in $(secs "$t_build" "$(now)") s"

# --- the guest's part ---------------------------------------------------------------------
out=$cache/out/$release
rm -rf "$out" && mkdir -p "$out"
# Writes part results as "RESULT NAME SECONDS DETAIL" to $out/parts; the host judges them.
{
  echo '#!/bin/bash'
  echo 'set -u'
  printf 'out=%q\nrepo=%q\nit=%q\nprobe_dir=%q\nsoak_rate=%q\nfull=%q\nexpect_events=%q\nfilter=%q\nrepeat=%q\n' \
    "$out" "$repo" "$it" "$probe_dir" "$soak_rate" "$full" "$expect_events" "$filter" "$repeat"
} >"$out/guest.sh"
cat >>"$out/guest.sh" <<'EOF'
exec >>"$out/guest.log" 2>&1
echo "booted $(uname -r) $(cat /proc/uptime | cut -d' ' -f1)" >"$out/booted"
cd "$repo"
part() { echo "$*" >>"$out/parts"; }
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
grep -qs ' cgroup2 ' /proc/mounts || { mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup; }
ulimit -n 65536

# Facts of this kernel.
btf=no; [ -r /sys/kernel/btf/vmlinux ] && btf=yes
lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)
tracing=""
for kind in fentry fexit tp_btf; do
  rm -rf /sys/fs/bpf/kernel-check-probe
  if timeout 60 bpftool prog loadall "$probe_dir/$kind.bpf.o" /sys/fs/bpf/kernel-check-probe \
      >"$out/probe-$kind.log" 2>&1; then
    tracing="$tracing $kind=loads"
  else
    tracing="$tracing $kind=refused"
  fi
  rm -rf /sys/fs/bpf/kernel-check-probe
done
echo "btf=$btf lockdown=${lockdown:-none}$tracing" >"$out/facts"

# The incident demo, with the binaries built on the host (not with a filter).
start=$(date +%s)
if [ -n "$filter" ]; then
  part "skipped demo 0 KERNEL_CHECK_FILTER"
else
  SMGC_BIN=$repo/target/debug timeout 600 bash scripts/demo.sh
  rc=$?
  part "$([ $rc -eq 0 ] && echo ok || echo FAIL) demo $(( $(date +%s) - start )) exit $rc"
fi

# The integration tests that depend on the kernel, one at a time. The package tests need
# the host's network and nothing of the kernel; the scale tests take minutes each under
# emulation and measure the product, not the kernel (KERNEL_CHECK_FULL=1 runs them too).
start=$(date +%s)
skip=(--skip package:: --skip image::)
skipped="package and container-image tests (no kernel in them; podman runs on the host)"
if [ "$full" != 1 ]; then
  skip+=(--skip bench_smoke:: --skip faults::a_full_map_of_65535_entries
    --skip identity::identity_read_against_a_key_walk_at_scale --skip sweep::sweep_deletes_the_incidents_7325)
  skipped="$skipped; scale tests (bench smoke, full map, identity at scale, 7,325 keys: run on the host; KERNEL_CHECK_FULL=1 runs them)"
fi
if [ "$soak_rate" = 0 ]; then skip+=(--skip soak::); skipped="$skipped; the soak (KERNEL_CHECK_SOAK_RATE=0)"; fi
# shellcheck disable=SC2206 # the filter is space-separated words
[ -n "$filter" ] && { skip+=($filter); skipped="$skipped; all but the tests matching: $filter"; }
echo "$skipped" >"$out/skipped"
rc=0
for run in $(seq "$repeat"); do
  [ "$repeat" = 1 ] || echo "--- run $run of $repeat"
  SMGC_EXPECT_EVENTS=$expect_events SMGC_SOAK_RATE=$soak_rate timeout 1500 "$it" --test-threads 1 "${skip[@]}" 2>&1 | tee -a "$out/it.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
part "$([ $rc -eq 0 ] && echo ok || echo FAIL) tests $(( $(date +%s) - start )) exit $rc"
echo done >"$out/done"
EOF

# --- boot ---------------------------------------------------------------------------------
say "booting $release under qemu (TCG, 2 CPUs, 4 GiB); guest output follows"
: >"$out/guest.log"
t_boot=$(now)
# vng exits 255 whatever the guest did (no udev here): results come back through $out.
# timeout runs it in its own process group and ends the whole group (qemu too).
PATH=$cache/venv/bin:$PATH timeout --kill-after=20 "$total_timeout" "$vng" --verbose --disable-kvm --force-9p \
  --busybox "$busybox" -r "$kernel" -p 2 -m 4G \
  --rwdir="$out" --overlay-rwdir="$(dirname "$repo")" \
  -e "bash $out/guest.sh" >"$out/console.log" 2>&1 </dev/null &
vm=$!
tail -n +1 -F --pid="$vm" "$out/guest.log" 2>/dev/null &
tailer=$!
booted=""
while kill -0 "$vm" 2>/dev/null; do
  if [ -z "$booted" ] && [ -e "$out/booted" ]; then
    booted=$(secs "$t_boot" "$(now)")
  fi
  if [ -z "$booted" ] && [ "$(secs "$t_boot" "$(now)")" -ge "$boot_timeout" ]; then
    kill -TERM "$vm" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait "$vm" 2>/dev/null || true
wait "$tailer" 2>/dev/null || true
t_end=$(now)
if [ -z "$booted" ] && [ ! -e "$out/booted" ]; then
  echo "--- last lines of the console ($out/console.log) ---"
  tail -n 30 "$out/console.log"
  if grep -q 'does not have module fs-9p' "$out/console.log"; then
    say "this kernel has no 9p (as Debian's cloud flavour): the guest cannot mount this machine's root; \
kernel-check needs CONFIG_NET_9P_VIRTIO and CONFIG_9P_FS, as modules or built in"
  fi
  fail "the guest did not boot $release: no first command after $(secs "$t_boot" "$t_end") s (limit ${boot_timeout} s; console above)"
fi
booted=${booted:-$(secs "$t_boot" "$t_end")}

# --- judging ------------------------------------------------------------------------------
echo
say "kernel $release: booted in $booted s (host wall clock, to the guest's first command)"
say "probe: $(cat "$out/facts" 2>/dev/null || echo 'not recorded') (trivial tracing programs loaded, not attached; sockmap-gc's own kernel events: the events kernel facts below)"
passed=0
failed=0
for name in demo tests; do
  line=$(grep -s " $name " "$out/parts" | tail -n 1 || true)
  if [ -z "$line" ]; then
    say "$name: FAIL: did not finish (guest run limit ${total_timeout} s, or the guest died)"
    failed=$((failed + 1))
    continue
  fi
  set -- $line
  result=$1 took=$3
  shift 3
  case $name in
    demo)
      if [ "$result" = skipped ]; then say "demo: skipped (KERNEL_CHECK_FILTER)"; continue; fi
      [ "$result" = ok ] && passed=$((passed + 1)) || failed=$((failed + 1))
      say "demo: $result in $took s ($*): the incident reproduced and cured in the guest" ;;
    tests)
      counts=$(awk '/^test result:/ { p += $4; f += $6; i += $8; x += $12 }
        END { printf "%d %d %d %d", p, f, i, x }' "$out/it.log")
      set -- $counts
      passed=$((passed + $1))
      failed=$((failed + $2))
      if [ "$result" != ok ] && [ "$2" = 0 ]; then failed=$((failed + 1)); fi
      say "integration tests: $result in $took s: $1 passed, $2 failed, $3 ignored, $4 not run here: $(cat "$out/skipped")" ;;
  esac
done
if grep -q '^failures:' "$out/it.log" 2>/dev/null; then
  say "failed tests: $(sed -n '/^failures:$/,/^test result/p' "$out/it.log" | grep '^    ' | tr -s ' ' | tr '\n' ' ')"
fi
# Facts the tests found that differ between kernels ("kernel fact: ..." evidence lines).
# libtest prints a test's name and its evidence on one line: match anywhere in the line.
grep -ho 'kernel fact: .*' "$out/it.log" 2>/dev/null | awk '!seen[$0]++' | sed 's/^/kernel-check: /' || true
say "guest stage took $(secs "$t_boot" "$t_end") s; logs in $out"
say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
