"""
Table 2 on the generated testbed: train and evaluate each configuration with several seeds.

  python ablate.py                                  # reduced budget (see --help), results in ablate_out/
  python ablate.py --max_steps=3000 --num_samples=100 --out_dir=ablate_long

Configurations (paper Table 2): baseline (Sa2VA: --mba=False, no TMC, no boundary loss), +MBA,
+MBA+TMC, +MBA+TMC+Bound, and the full model's weights evaluated with MBA switched off.
Each seed trains with `train.py` and is scored with `eval.py --force_seg=True` on the generated image
val split (cIoU/gIoU overall and per expression kind) and on the distractor split (a small target beside
a larger shape of its colour and kind, where the paper says attention drifts): the answer "Sure, [SEG]." is teacher-forced, so
the table compares masks, not whether a short run already learned to answer with [SEG]. Writes results.json, table.md and chart.png.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import testbed

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # name: (train.py flags, eval.py flags, trained weights used)
    "baseline": (["--mba=False", "--lambda_tmc=0", "--lambda_bound=0"], [], "baseline"),
    "+MBA": (["--lambda_tmc=0", "--lambda_bound=0"], [], "+MBA"),
    "+MBA+TMC": (["--lambda_bound=0"], [], "+MBA+TMC"),
    "+MBA+TMC+Bound": ([], [], "+MBA+TMC+Bound"),
    "full, MBA off at eval": (None, ["--mba=False"], "+MBA+TMC+Bound"),
}
KINDS = testbed.IMAGE_KINDS


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--max_steps", type=int, default=1200, help="training steps per run, after train.py's SAM-2 encoder pretraining "
                   "(default 1200: the reduced budget; README gives the time)")
    p.add_argument("--sam2_pretrain_frac", type=float, default=1.5, help="train.py's SAM-2 encoder pretraining, as a fraction of "
                   "--max_steps (default 1.5: 1800 pretraining steps before 1200 main ones, the setup of README's Table 2)")
    p.add_argument("--num_samples", type=int, default=50, help="generated val images scored per run (default 50, as eval.py)")
    p.add_argument("--out_dir", default="ablate_out", help="where runs, results.json, table.md and chart.png go")
    p.add_argument("--data", default="synthetic:1", help="train.py --data (default: train.py's generated mix, a quarter of it videos; "
                   "images alone stayed on 'every shape' for 2400 steps)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run in parallel, one process each (default 2 = 2 cores)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (default 1)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.num_samples < 1 or args.max_steps < 1 or args.sam2_pretrain_frac < 0:
        p.error("--seeds, --num_samples and --max_steps must be >= 1, --sam2_pretrain_frac >= 0")
    return args


def run(cmd, log_path, threads):
    """Run a command with its output in log_path; one clear line if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"ablate.py: {' '.join(cmd[:1])} failed (exit {proc.returncode}); see {log_path}")


def evaluate(name, seed, run_dir, args):
    """Score one configuration's weights on the val and distractor splits; returns {dataset: eval.py metrics}."""
    metrics = {}
    for dataset in ("synthetic", "synthetic_distractor"):
        eval_dir = os.path.join(args.out_dir, "eval", f"{name}_seed{seed}_{dataset}".replace(" ", "_").replace(",", ""))
        run(["eval.py", "--ckpt", run_dir, *CONFIGS[name][1], "--dataset", dataset, "--num_samples", str(args.num_samples),
             "--quiet", "--force_seg=True", "--out_dir", eval_dir], eval_dir + ".log", args.threads)
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            metrics[dataset] = json.load(f)
    return metrics


def train_and_evaluate(weights, seed, args):
    """Train one set of weights (unless its checkpoint exists) and score every configuration that uses them."""
    run_dir = os.path.join(args.out_dir, "runs", f"{weights}_seed{seed}")
    if not os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        run(["train.py", *CONFIGS[weights][0], f"--max_steps={args.max_steps}", f"--sam2_pretrain_frac={args.sam2_pretrain_frac}",
             f"--data={args.data}", f"--seed={seed}", f"--out_dir={run_dir}"], run_dir + "_train.log", args.threads)
    return {name: scores(evaluate(name, seed, run_dir, args)) for name, c in CONFIGS.items() if c[2] == weights}


def scores(metrics):
    """{'all': cIoU, kind: cIoU, 'gIoU': gIoU, 'distractor': cIoU} of one run's eval.py metrics."""
    val = metrics["synthetic"]
    out = {"all": val["cIoU"], "gIoU": val["gIoU"], "distractor": metrics["synthetic_distractor"]["cIoU"]}
    out.update({kind: val["by_kind"].get(kind, {}).get("cIoU", float("nan")) for kind in KINDS})
    return out


def mean_std(values):
    """'mean ± std' (std over seeds, ddof 0)."""
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def write_table(results, path):
    """Markdown table: cIoU (all, per kind) and gIoU, mean ± std over seeds."""
    columns = ["all", *KINDS, "gIoU", "distractor"]
    lines = ["| configuration | " + " | ".join({"gIoU": "gIoU", "distractor": "cIoU distractor split"}.get(c, f"cIoU {c}") for c in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for name, per_seed in results.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([s[c] for s in per_seed]) for c in columns) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def write_chart(results, path):
    """Grouped bars: cIoU per configuration, overall and per kind, with the seeds' std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["all", *KINDS, "distractor"]
    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(names):
        means = [np.mean([s[c] for s in results[name]]) for c in columns]
        stds = [np.std([s[c] for s in results[name]]) for c in columns]
        ax.bar(np.arange(len(columns)) + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(np.arange(len(columns)), ["all expressions", *KINDS, "distractor split"])
    ax.set_ylabel("cIoU (%) on generated val")
    seeds = len(next(iter(results.values())))
    ax.set_title(f"Table 2 on the generated testbed: mean ± std over {seeds} seeds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    """Run every configuration and seed, then write the JSON, the table and the chart."""
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    os.makedirs(os.path.join(args.out_dir, "eval"), exist_ok=True)
    trainings = [(weights, seed) for seed in range(args.seeds) for weights, c in CONFIGS.items() if c[0] is not None]
    bar = tqdm(total=len(trainings), desc="ablate", unit="training")

    def one_training(job):  # every training is independent, so the jobs keep all cores busy to the end
        out = train_and_evaluate(*job, args)
        bar.update(1)
        return job[1], out

    per_seed = [{} for _ in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        for seed, out in pool.map(one_training, trainings):
            per_seed[seed].update(out)
    bar.close()
    results = {name: [scores_of_seed[name] for scores_of_seed in per_seed] for name in CONFIGS}
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"flags": vars(args), "configs": {n: {"train": c[0], "eval": c[1]} for n, c in CONFIGS.items()},
                   "per_seed": results}, f, indent=2)
    print(write_table(results, os.path.join(args.out_dir, "table.md")))
    write_chart(results, os.path.join(args.out_dir, "chart.png"))
    print(f"wrote {args.out_dir}/results.json, table.md, chart.png")


if __name__ == "__main__":
    main()
