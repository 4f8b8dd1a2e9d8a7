#!/usr/bin/env bash
# Runs the transport conformance suite with `--features rdma` inside a qemu VM that boots
# Debian's stock kernel (which builds rdma_rxe) and brings up a soft-RoCE device on a veth pair.
#
#   tests/rdma-vm/run.sh            # build, boot, run the rdma:: (and tcp::, shm::) cases, report
#   tests/rdma-vm/run.sh --bench F  # also run `hetkv-bench transport` in the guest; JSON to F
#                                   # (soft-RoCE under TCG: a correctness run, not performance)
#
# The host needs no RDMA support: the guest kernel has it. The guest mounts the host's /usr and
# /etc read-only over 9p (so the test binary and libibverbs with its rxe provider run unchanged)
# and writes its log and exit status to a read-write share; this script reads them after qemu
# exits. It fails loudly if anything is missing, the VM does not boot, no rxe device comes up, no
# RDMA test ran, or any test failed: it never skips. Facts behind it: shared/notes/rdma-vm.md.
set -euo pipefail

BENCH_OUT=
if [[ ${1:-} == --bench ]]; then BENCH_OUT=$(realpath -m "$2"); shift 2; fi
cd "$(dirname "$0")/../.."
ROOT=$PWD
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$TARGET/rdma-vm"
mkdir -p "$WORK"
say() { echo "rdma-vm: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# --- host packages -------------------------------------------------------------------------------
need=()
for pkg in qemu-system-x86 busybox-static cpio libibverbs-dev librdmacm-dev ibverbs-providers \
    rdma-core libclang-14-dev iproute2 pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    say "installing ${need[*]}"
    [[ $(id -u) -eq 0 ]] || die "needs root to install ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# --- the kernel ------------------------------------------------------------------------------------
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(kernel_pkg)
if [[ -z $KPKG ]]; then   # a fresh machine may have no package lists yet
    apt-get update -q >/dev/null || die "apt-get update"
    KPKG=$(kernel_pkg)
fi
[[ -n $KPKG ]] || die "cannot resolve Debian's stock kernel package from linux-image-amd64"
KDIR="$WORK/$KPKG"
if [[ ! -d $KDIR/boot ]]; then
    say "fetching $KPKG"
    (cd "$WORK" && apt-get download "$KPKG" >/dev/null) || die "apt-get download $KPKG"
    rm -rf "$KDIR.tmp" && mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$WORK/${KPKG}"_*.deb "$KDIR.tmp"
    mv "$KDIR.tmp" "$KDIR"
fi
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$KDIR/lib/modules/$KVER"
[[ -f $MODDIR/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko || -f $MODDIR/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko.xz ]] ||
    die "$KPKG has no rdma_rxe module"

# --- the test binaries --------------------------------------------------------------------------------
# The transport conformance suite and the cache's model-based consistency test, with RDMA cases;
# and the store's restart tests, whose RDMA case runs real daemons (the `hetkv` binary built with
# the feature, found in the guest through $HETKV_BIN) across a SIGKILL and a restore; and the
# daemon's memory bound in a memory cgroup (the guest mounts cgroup v2 with the memory controller,
# so that test must run here, whatever the host offers).
TESTS="conformance cache_consistency restarts cgroup"
say "building the tests ($TESTS) and the daemon with --features rdma"
declare -A BINS
while read -r name exe; do BINS[$name]=$exe; done < <(
    {
        cargo test -q -p hetkv-tests --features rdma --test conformance --test cache_consistency \
            --no-run --message-format=json
        cargo test -q -p hetkv-store --features rdma --test restarts --test cgroup --no-run \
            --message-format=json
    } 2>/dev/null | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"], m["target"]["name"]
    if "test" in kind:
        print(name, m["executable"])
    elif "bin" in kind and name == "hetkv":
        print("daemon", m["executable"])')
BINDIR=$WORK/bin
rm -rf "$BINDIR" && mkdir -p "$BINDIR"
for t in $TESTS daemon; do
    [[ -x ${BINS[$t]:-} ]] || die "the test binary $t was not built (cargo test --features rdma --no-run)"
done
for t in $TESTS; do cp "${BINS[$t]}" "$BINDIR/$t"; done
cp "${BINS[daemon]}" "$BINDIR/hetkv"
echo "$TESTS" > "$BINDIR/tests"
BIN=$BINDIR/conformance
say "host probe: $("$BIN" rdma_probe_opens_a_device_or_names_the_reason --exact --nocapture 2>&1 | grep -E 'no RDMA here|RDMA device' || echo 'probe test failed')"
"$BIN" rdma_probe_opens_a_device_or_names_the_reason --exact -q >/dev/null 2>&1 ||
    die "the RDMA probe test failed on the host"
if [[ -n $BENCH_OUT ]]; then
    say "building hetkv-bench with --features rdma"
    cargo build -q --release -p hetkv-bench --features rdma
    cp "$TARGET/release/hetkv-bench" "$BINDIR/hetkv-bench"
fi

# --- the initramfs -------------------------------------------------------------------------------------
# Modules in dependency order: each wanted module after everything it depends on.
WANT="virtio_pci virtio_blk 9pnet_virtio 9p crc32_generic ib_core ib_uverbs udp_tunnel
      ip6_udp_tunnel rdma_rxe ib_cm iw_cm configfs rdma_cm rdma_ucm veth"
ORDER=$(python3 - "$MODDIR" $WANT <<'EOF'
# The .deb ships no modules.dep (depmod makes it at install): read each module's `depends=` from
# its .modinfo strings instead.
import os, re, sys
moddir, want = sys.argv[1], sys.argv[2:]
path = {}
for d, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        if ".ko" in f:
            path[f.split(".ko")[0].replace("-", "_")] = os.path.relpath(os.path.join(d, f), moddir)
def deps(name):
    data = open(os.path.join(moddir, path[name]), "rb").read()
    if path[name].endswith(".xz"):
        import lzma; data = lzma.decompress(data)
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    return [x.replace("-", "_") for x in m[1].decode().split(",") if x] if m else []
done, order = set(), []
def visit(n):
    if n in done or n not in path: return   # absent = built into this kernel
    done.add(n)
    for d in deps(n): visit(d)
    order.append(n)
for w in want: visit(w)
for n in order: print(path[n])
EOF
)
INITRD_DIR=$WORK/initramfs
rm -rf "$INITRD_DIR" && mkdir -p "$INITRD_DIR"/{bin,dev,proc,sys,tmp,usr,etc,mods,work,out,run}
cp /bin/busybox "$INITRD_DIR/bin/busybox"
ln -s usr/lib "$INITRD_DIR/lib"
ln -s usr/lib64 "$INITRD_DIR/lib64"
ln -s usr/sbin "$INITRD_DIR/sbin"
: > "$INITRD_DIR/mods/order"
for m in $ORDER; do
    f="$MODDIR/$m"
    case "$f" in
        *.ko.xz) xz -dc "$f" > "$INITRD_DIR/mods/$(basename "${f%.xz}")" ;;
        *.ko.zst) zstd -dcq "$f" > "$INITRD_DIR/mods/$(basename "${f%.zst}")" ;;
        *) cp "$f" "$INITRD_DIR/mods/" ;;
    esac
    b=$(basename "$m"); echo "${b%.xz}" | sed 's/\.zst$//' >> "$INITRD_DIR/mods/order"
done
cat > "$INITRD_DIR/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
mount -t cgroup2 none /sys/fs/cgroup && echo +memory > /sys/fs/cgroup/cgroup.subtree_control
for m in $(cat /mods/order); do insmod /mods/$m >> /tmp/insmod.log 2>&1 || echo "insmod $m failed" >> /tmp/insmod.log; done
mount -t 9p -o trans=virtio,version=9p2000.L out /out || { echo "no out share"; poweroff -f; }
exec > /out/guest.log 2>&1
cat /tmp/insmod.log
mount -t 9p -o trans=virtio,version=9p2000.L,ro usr /usr
mount -t 9p -o trans=virtio,version=9p2000.L,ro etc /etc
mount -t 9p -o trans=virtio,version=9p2000.L,ro work /work
mount -t configfs none /sys/kernel/config 2>/dev/null
IP=/usr/bin/ip; RDMA=/usr/bin/rdma
$IP link set lo up
$IP link add veth0 type veth peer name veth1
$IP addr add 10.99.0.1/24 dev veth0
$IP link set veth0 up; $IP link set veth1 up
$RDMA link add rxe0 type rxe netdev veth0
sleep 1
$RDMA link show
if [ ! -e /dev/infiniband/uverbs0 ]; then echo "NO-RXE-DEVICE"; echo 97 > /out/rc; poweroff -f; fi
echo "RXE-UP"
cd /tmp
export HETKV_BIN=/work/hetkv HETKV_CGROUP_REQUIRED=1
rc=0
for t in $(cat /work/tests); do
    echo "== $t"
    /work/$t --test-threads=1 --nocapture 2>&1 || rc=1
done
echo $rc > /out/rc
if [ -x /work/hetkv-bench ]; then
    /work/hetkv-bench transport --table-bytes 33554432 --seconds 1 --shm-dir /dev/shm \
        --json /out/transport.json 2>&1 | grep -v '^ '
fi
poweroff -f
EOF
chmod +x "$INITRD_DIR/init"
(cd "$INITRD_DIR" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

# --- boot ------------------------------------------------------------------------------------------------
OUT=$WORK/out
rm -rf "$OUT" && mkdir -p "$OUT"
share() { echo "-virtfs local,path=$1,mount_tag=$2,security_model=none${3:+,readonly=on}"; }
say "booting $KPKG under qemu (TCG) with $(nproc) vCPUs max 2"
start=$(date +%s)
# shellcheck disable=SC2046
timeout 1500 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
    -nographic -nic none -no-reboot -serial file:"$WORK/console.log" -monitor none \
    -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" -append "console=ttyS0 panic=-1 quiet" \
    $(share /usr usr ro) $(share /etc etc ro) $(share "$BINDIR" work ro) $(share "$OUT" out) \
    > "$WORK/qemu.log" 2>&1 || say "qemu exited with $? after $(( $(date +%s) - start )) s"
say "VM ran $(( $(date +%s) - start )) s"

# --- the guest's result -------------------------------------------------------------------------------
[[ -f $OUT/guest.log ]] || { tail -30 "$WORK/console.log" >&2 || true; die "the VM did not boot far enough to write its log"; }
cat "$OUT/guest.log"
grep -q RXE-UP "$OUT/guest.log" || die "no soft-RoCE (rxe) device came up in the guest"
[[ -f $OUT/rc ]] || die "the guest did not finish the suite (no exit status)"
# With --nocapture a test's "ok" may follow its own output, so count failures, not oks.
rdma_all=$(grep -cE '^test [^ ]*rdma' "$OUT/guest.log" || true)
rdma_failed=$(grep -E '^test [^ ]*rdma' "$OUT/guest.log" | grep -c FAILED || true)
rc=$(cat "$OUT/rc")
say "RDMA tests inside the guest: $((rdma_all - rdma_failed)) of $rdma_all passed (soft-RoCE: rxe0 over a veth, emulated)"
[[ $rdma_all -gt 0 ]] || die "no RDMA test ran"
[[ $rc -eq 0 && $rdma_failed -eq 0 ]] || die "the suite failed in the guest (exit $rc)"
if [[ -n $BENCH_OUT ]]; then
    [[ -f $OUT/transport.json ]] || die "hetkv-bench transport wrote no report in the guest"
    cp "$OUT/transport.json" "$BENCH_OUT"
    say "guest transport report (soft-RoCE under TCG emulation) written to $BENCH_OUT"
fi
say "passed"
