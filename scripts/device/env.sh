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
DIFFUSE=.device/diffuse
# `ours ARGS`: one `diffuse bench --device cuda` run, its rows appended to $ROWS, stderr to $LOG.
ours() { echo "== ours $*" | tee -a $LOG; $DIFFUSE bench --device cuda --json "$@" 2>>$LOG > /tmp/o.json; python3 -c "
import json; [print(json.dumps(dict(r, system='diffuse'))) for r in json.load(open('/tmp/o.json'))['rows']]" >> $ROWS; }
