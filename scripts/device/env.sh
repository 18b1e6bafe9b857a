# Sourced at the start of every command on the lent GPU machine (see ../../DEVICE notes in
# BENCHMARKS.md): unpacks the oneDNN/libgomp libraries the static binary links, and points the
# CUDA backend at the CUDA 13 libraries that ship inside PyTorch's wheels.
set -u
mkdir -p /tmp/dlibs
tar -xJf .device/libs.tar.xz -C /tmp/dlibs
ln -sf libdnnl.so.2.6 /tmp/dlibs/libdnnl.so.2
ln -sf libgomp.so.1.0.0 /tmp/dlibs/libgomp.so.1
ln -sf libOpenCL.so.1.0.0 /tmp/dlibs/libOpenCL.so.1
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0] if hasattr(nvidia, '__path__') else nvidia.__file__))" 2>/dev/null)/nvidia
export DIFFUSE_CUDA_LIBS="$NV/*/lib"
export LD_LIBRARY_PATH="/tmp/dlibs:$(ls -d $NV/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export XDG_CACHE_HOME=/tmp/diffuse-cache
# torch.compile(max-autotune)'s compilation outlives one session's device time (over 17 minutes
# for SD 1.5 on an H100), so its inductor cache is carried from session to session: each GEMM's
# autotuning result is written there as soon as it is measured (the cache is keyed by GPU, CUDA
# and Triton versions, so another GPU kind simply misses). `save_peer_cache` puts it in
# $OUT/inductor-cache.tar.xz; copy that to .device/ before the next session's first command.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
if [ -f .device/inductor-cache.tar.xz ] && [ ! -d $TORCHINDUCTOR_CACHE_DIR ]; then
  mkdir -p $TORCHINDUCTOR_CACHE_DIR && tar -xJf .device/inductor-cache.tar.xz -C $TORCHINDUCTOR_CACHE_DIR
fi
save_peer_cache() {
  [ -d $TORCHINDUCTOR_CACHE_DIR ] || return 0
  # Everything if it fits the carry budget (~16 MB compressed), else the autotuning results alone.
  tar -C $TORCHINDUCTOR_CACHE_DIR --warning=no-file-changed -cJf $OUT/inductor-cache.tar.xz . 2>/dev/null
  if [ $(stat -c %s $OUT/inductor-cache.tar.xz) -gt 16000000 ]; then
    (cd $TORCHINDUCTOR_CACHE_DIR && find . -path ./locks -prune -o -type f -name '*.json' -print0 | \
       tar --null -T - --warning=no-file-changed -cJf $OUT/inductor-cache.tar.xz 2>/dev/null)
  fi
  echo "inductor cache: $(du -sh $TORCHINDUCTOR_CACHE_DIR | cut -f1) -> $(du -h $OUT/inductor-cache.tar.xz | cut -f1) in \$OUT"
}
DIFFUSE=.device/diffuse
# `ours ARGS`: one `diffuse bench --device cuda` run, its rows appended to $ROWS, stderr to $LOG.
ours() { echo "== ours $*" | tee -a $LOG; $DIFFUSE bench --device cuda --json "$@" 2>>$LOG > /tmp/o.json; python3 -c "
import json; [print(json.dumps(dict(r, system='diffuse'))) for r in json.load(open('/tmp/o.json'))['rows']]" >> $ROWS; }
