#!/usr/bin/env bash
# Makes `ip` and `tc` usable on a host without iproute2 and without a package manager's network:
# unpacks Debian's iproute2 and the libraries it needs from .deb files (fetched elsewhere with
# `apt-get download iproute2 libbpf1 libelf1 libmnl0 libbsd0 libcap2 libxtables12 libmd0 zlib1g`)
# into a private folder, never into /, and writes wrappers that set LD_LIBRARY_PATH.
#
#   PATH="$(bash bench/scripts/iproute-from-debs.sh DEB_DIR DEST):$PATH"
#
# Prints the folder holding the wrappers.
set -euo pipefail
debs=$(cd "$1" && pwd)
dest=$(mkdir -p "$2" && cd "$2" && pwd)
command -v dpkg-deb >/dev/null || { echo "iproute-from-debs: needs dpkg-deb" >&2; exit 1; }
for f in "$debs"/*.deb; do dpkg-deb -x "$f" "$dest/root"; done
mkdir -p "$dest/bin"
libs="$dest/root/lib/x86_64-linux-gnu:$dest/root/usr/lib/x86_64-linux-gnu"
for tool in ip tc; do
    bin=$(find "$dest/root" -name "$tool" -type f -perm -u+x | head -1)
    [[ -n $bin ]] || { echo "iproute-from-debs: no $tool in $debs" >&2; ls -R "$dest/root" | head -30 >&2; exit 1; }
    cat > "$dest/bin/$tool" <<WRAP
#!/bin/sh
# tc finds its qdisc modules and distribution tables here.
export TC_LIB_DIR="$dest/root/usr/lib/tc"
LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$bin" "\$@"
WRAP
    chmod +x "$dest/bin/$tool"
done
"$dest/bin/ip" -V >&2
echo "$dest/bin"
