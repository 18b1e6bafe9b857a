"""The stable-diffusion.cpp peer: runs its CLI (sd-cli) on a random-weight SD 1.5 checkpoint and
turns its log into rows in the schema of `diffuse bench --json`. Run through sdcpp.sh.

Each run is one process: load the checkpoint (converting to --type on load), encode the prompt,
sample --steps steps with classifier-free guidance, decode, write a PNG. Per run it reads:

  unet row        the sampler's per-step times from sd.cpp's progress line (printed with 2
                  significant decimals), the first step left out because it also builds and
                  allocates the graph; one step = the conditional and the unconditional forward
                  (two batch-1 UNet evaluations), the work of one batch-2 forward in diffuse's and
                  diffusers' unet rows, so batch is 2.
  vae row         "decode_first_stage completed, taking X s": one latent, graph build included.
  text-encoder    "get_learned_condition completed": both prompts (batch 2), graph build included.
  pipeline row    "generate_image completed in X s" (prompt to decoded image; model loading not
                  included, reported as load_s), with the process's peak RSS from /usr/bin/time -v
                  (loading included: sd.cpp reads the weights into memory without --mmap).

Several --reps are separate processes; their times are pooled into median/min/max.

What differs from diffuse's and diffusers' rows: every run is a cold process (the first call of
each model, graph allocation included; the per-step time leaves the first step out); the weights
are loaded up front (--eager-load, unless --lazy-load) so that no row but load_s holds loading;
and sd.cpp keeps convolution weights in f16 whatever --type says (its Conv2d is f16 + im2col), so
"f32" means f32 linear layers and f16 convolutions, "q8_0" q8_0 linear layers and f16 convolutions.
"""
import argparse, json, os, re, statistics, subprocess, sys, time
from pathlib import Path

PROGRESS = re.compile(r"(\d+)/(\d+) - ([0-9.]+)(s/it|it/s)")
LOGS = {
    "load_s": re.compile(r"loading tensors completed, taking ([0-9.]+)s"),
    "text_encoder_s": re.compile(r"get_learned_condition completed, taking ([0-9.]+)s"),
    "sampling_s": re.compile(r"sampling completed, taking ([0-9.]+)s"),
    "vae_s": re.compile(r"decode_first_stage completed, taking ([0-9.]+)s"),
    "total_s": re.compile(r"generate_image completed in ([0-9.]+)s"),
}
PARAMS = re.compile(r"total params memory size = ([0-9.]+)MB.*?text_encoders ([0-9.]+)MB.*?diffusion_model ([0-9.]+)MB.*?vae ([0-9.]+)MB")
RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([0-9.]+)")
PROMPT = "a photo of an astronaut riding a horse on mars"


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", required=True, help="the sd-cli binary")
    p.add_argument("--model", required=True, help="the LDM-layout SD 1.x checkpoint (make_sd15_ldm_checkpoint.py)")
    p.add_argument("--size", default="512x512", help="image WxH")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per run (>= 2 for a per-step time without the first step)")
    p.add_argument("--types", default="f32", help="comma-separated weight types for --type (f32, f16, q8_0, ...)")
    p.add_argument("--fa", default="off", choices=["off", "on", "both"], help="sd.cpp's --fa (flash attention in every model)")
    p.add_argument("--reps", type=int, default=1, help="processes per configuration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--sampling-method", default="euler", help="one model evaluation per step (euler, ddim_trailing, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--architecture", default="sd15", help="the name put in the rows")
    p.add_argument("--commit", default="unknown", help="the sd.cpp commit put in the rows")
    p.add_argument("--taesd", help="decode with this tiny autoencoder (sd.cpp's --taesd) instead of the model's VAE")
    p.add_argument("--lazy-load", action="store_true",
                   help="let sd.cpp load each model's weights on first use (its default) instead of --eager-load: "
                        "the loading then falls inside the first step, the decode and the prompt encoding")
    p.add_argument("--logs", default="/tmp/sdcpp-logs", help="folder for each run's log and image")
    return p.parse_args()


def run_once(a, wtype, fa, rep):
    w, h = (int(v) for v in a.size.lower().split("x"))
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{a.architecture}-{w}x{h}-{a.steps}steps-{wtype}-fa{'on' if fa else 'off'}{'-taesd' if a.taesd else ''}-rep{rep}"
    log, timing = logs / f"{stem}.log", logs / f"{stem}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(timing), a.sd, "-m", a.model, "--type", wtype, "-t", str(a.threads),
           "-p", PROMPT, "-W", str(w), "-H", str(h), "--steps", str(a.steps), "--cfg-scale", str(a.cfg_scale),
           "--sampling-method", a.sampling_method, "--seed", str(a.seed), "-o", str(logs / f"{stem}.png"), "-v"]
    if fa:
        cmd.append("--fa")
    if a.taesd:
        cmd += ["--taesd", a.taesd]
    if not a.lazy_load:
        cmd.append("--eager-load")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        lines = text.splitlines()[1:]
        errors = [l for l in lines if "[ERROR]" in l] or lines[-15:]  # after an argument error it prints its usage
        raise SystemExit(f"sd-cli failed ({proc.returncode}) for {stem}; log {log}:\n" + "\n".join(errors))
    got = {}
    for name, pattern in LOGS.items():
        found = [float(v) for v in pattern.findall(text)]
        if not found:
            raise SystemExit(f"{log}: no '{pattern.pattern}' line; the sd.cpp log format has changed")
        # Lazy loading loads each model on its own; everything else is logged once per image.
        got[name] = sum(found) if name == "load_s" else found[0]
    steps = {}
    for line in re.split(r"[\r\n]", text):
        m = PROGRESS.search(line)
        if m and int(m.group(2)) == a.steps:  # the sampler's bar (the loading bar prints GB/s, MB/s)
            v = float(m.group(3))
            steps[int(m.group(1))] = v if m.group(4) == "s/it" else 1 / v
    if sorted(steps) != list(range(1, a.steps + 1)):
        raise SystemExit(f"{log}: found progress for steps {sorted(steps)}, expected 1..{a.steps}")
    got["step_s"] = [steps[i] for i in sorted(steps)]
    m = PARAMS.search(text)  # the weights as sd.cpp holds them after converting to --type
    got["params_mb"] = dict(zip(("total", "text_encoder", "unet", "vae"), map(float, m.groups()))) if m else None
    t = timing.read_text()
    got["peak_rss_mb"] = int(RSS.search(t).group(1)) / 1024
    m = WALL.search(t)
    got["wall_s"] = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    got["log"] = str(log)
    print(f"{stem}: steps {got['step_s']} s, vae {got['vae_s']} s, total {got['total_s']} s, "
          f"peak RSS {got['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return got


def summary(times):
    return dict(median_s=round(statistics.median(times), 4), min_s=round(min(times), 4), max_s=round(max(times), 4))


def main():
    a = parse()
    if a.steps < 1:
        raise SystemExit("--steps must be at least 1")
    w, h = (int(v) for v in a.size.lower().split("x"))
    size = f"{w}x{h}"
    fas = {"off": [False], "on": [True], "both": [False, True]}[a.fa]
    rows = []
    for wtype in a.types.split(","):
        for fa in fas:
            runs = [run_once(a, wtype, fa, rep) for rep in range(a.reps)]
            setup = f"sdcpp-{wtype}" + ("-fa" if fa else "") + ("-taesd" if a.taesd else "")
            common = dict(system="stable-diffusion.cpp", setup=setup, architecture=a.architecture, size=size,
                          commit=a.commit, weight_type=wtype, flash_attention=fa, threads=a.threads, reps=a.reps,
                          sampling_method=a.sampling_method, eager_load=not a.lazy_load,
                          params_mb=runs[0]["params_mb"])
            later = [s for r in runs for s in r["step_s"][1:]]
            first = [r["step_s"][0] for r in runs]
            rows.append(dict(common, component="unet", batch=2, **summary(later or first),
                             peak_rss_mb=round(max(r["peak_rss_mb"] for r in runs), 1),
                             first_step_s=round(statistics.median(first), 4),
                             step_samples=len(later or first),
                             note=("one sampling step (cond + uncond UNet evaluations, batch 1 each) from sd.cpp's "
                                   "progress line (2 decimals); " + ("first step left out (graph build)" if later else
                                   "only the first step, graph build included: use --steps >= 2"))))
            rows.append(dict(common, component="taesd" if a.taesd else "vae", batch=1, **summary([r["vae_s"] for r in runs]),
                             peak_rss_mb=round(max(r["peak_rss_mb"] for r in runs), 1),
                             note="decode_first_stage of one latent, graph build included"))
            rows.append(dict(common, component="text-encoder", batch=2, **summary([r["text_encoder_s"] for r in runs]),
                             peak_rss_mb=round(max(r["peak_rss_mb"] for r in runs), 1),
                             note="get_learned_condition (prompt and empty negative prompt), graph build included"))
            totals = [r["total_s"] for r in runs]
            med = statistics.median(totals)
            rows.append(dict(common, component="pipeline", batch=1, **summary(totals),
                             peak_rss_mb=round(max(r["peak_rss_mb"] for r in runs), 1),
                             steps=a.steps, it_per_s=round(a.steps / med, 2),
                             sampling_s=round(statistics.median(r["sampling_s"] for r in runs), 2),
                             load_s=round(statistics.median(r["load_s"] for r in runs), 2),
                             process_wall_s=round(statistics.median(r["wall_s"] for r in runs), 2),
                             note=("generate_image: prompt to decoded image, model loading excluded (load_s); "
                                   "peak_rss_mb is the whole process's (/usr/bin/time -v), loading included"),
                             logs=[r["log"] for r in runs]))
            for row in rows[-4:]:
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(dict(system="stable-diffusion.cpp", rows=rows)))


if __name__ == "__main__":
    main()
