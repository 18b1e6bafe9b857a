#!/usr/bin/env bash
# Runs a command inside a memory cgroup limited to LIMIT_MB megabytes (page cache included, as
# the kernel charges it), to show what fits in a small machine: with --offload sequential the
# CPU pipeline reads its weights through the page cache, which the kernel reclaims under the
# limit, so it still runs (slower: it rereads the disk); a setup that holds its weights is
# killed by the OOM killer. Needs root and a writable memory cgroup (v1 or v2).
#
#   scripts/bench/memory-limit.sh 1536 .build/release/diffuse bench --component pipeline --setups sequential-offload ...
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LIMIT_MB COMMAND..." >&2; exit 2; }
limit=$(( $1 << 20 )); shift
name=diffuse-limit-$$
if own=$(grep -m1 '^[0-9]*:memory:' /proc/self/cgroup | cut -d: -f3) && [ -d /sys/fs/cgroup/memory$own ]; then
    cg=/sys/fs/cgroup/memory$own/$name
    mkdir "$cg" && echo $limit > "$cg/memory.limit_in_bytes"
else
    own=$(grep -m1 '^0::' /proc/self/cgroup | cut -d: -f3)
    cg=/sys/fs/cgroup$own/$name
    mkdir "$cg" && echo $limit > "$cg/memory.max"
fi
echo "memory-limit.sh: running $1 in $cg, limit $(( limit >> 20 )) MB" >&2
# The command runs in a child so this shell can remove the cgroup afterwards.
( echo $BASHPID > "$cg/cgroup.procs"; exec "$@" ) && rc=0 || rc=$?
[ -f "$cg/memory.max_usage_in_bytes" ] && echo "memory-limit.sh: cgroup peak $(( $(cat "$cg/memory.max_usage_in_bytes") >> 20 )) MB (page cache included)" >&2
rmdir "$cg" 2>/dev/null || true
exit $rc
