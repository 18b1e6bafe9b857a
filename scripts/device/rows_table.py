"""The short table at the end of a GPU bench run: one line per row of $OUT/rows.jsonl
(ours and the diffusers peer). Rows of setups that did not run have no median."""
import json, os

for line in open(os.path.join(os.environ["OUT"], "rows.jsonl")):
    r = json.loads(line)
    steps = r.get("steps") or 0
    median = r.get("median_s")
    it = r.get("it_per_s") or (round(steps / median, 2) if steps and median else "")
    print(f"{r.get('system', 'diffusers'):9} {r['architecture']:9} {r['setup']:24} {r['component']:8} {r['size']:9} "
          f"median {(median or 0):.3f}s it/s {it} gpu {r.get('peak_gpu_mb')}MB first {r.get('first_run_s', '')} "
          f"err {r.get('max_rel_err', '')} {str(r.get('note', ''))[:60]}")
