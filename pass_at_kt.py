"""pass_at_kt.py: pass@(k, T), the share of questions that some of k samples answer right when T tool calls are
allowed, for each model given: the metric that shows whether RL taught a model to gather what it needs.

    python pass_at_kt.py --models base=HuggingFaceTB/SmolLM2-135M-Instruct,trained=out-lookup/final \\
        --dataset data/lookup --tools lookup --eval_size 100 --out docs/lookup

For each model and each T in --calls, grpo.py evaluates --eval_size test questions (--eval_only, --max_tool_calls T)
with n = max(--ks) samples each at --temperature, and pass@k is the unbiased estimate from those n samples,
1 - C(n - c, k) / C(n, k) with c of them right (Chen et al., arXiv 2107.03374), averaged over the questions; the
greedy answer's accuracy comes too. Writes OUT/pass_at_kt.json, OUT/pass_at_kt.md (a table) and OUT/pass_at_kt.png.
Each evaluation (OUT/NAME-T<T>/) is long on a CPU: one that finished is read again, not rerun, when its settings
(settings.json, written as it ends) are this run's, so a stopped measurement, run again, does only what is missing.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import grpo


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples of which c are right: 1 - C(n - c, k) / C(n, k).

    >>> pass_at_k(8, 1, 1), pass_at_k(8, 1, 8), pass_at_k(8, 0, 4)
    (0.125, 1.0, 0.0)
    """
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def measure(model: str, args, T: int, out: str) -> dict:
    """One model at T calls: grpo.py's evaluation (or the one out holds, made with these settings), then pass@k for
    every k from each question's correct samples."""
    n = max(args.ks)
    cfg = grpo.Config(model=model, dataset=args.dataset, tools=args.tools, max_tool_calls=T, eval_only=True,
                      eval_size=args.eval_size, eval_samples=n, temperature=args.temperature, output_dir=out,
                      max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size, device=args.device,
                      seed=args.seed)  # fmt: skip
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}
    done = os.path.join(out, "settings.json")
    finished = False
    if os.path.exists(done):
        with open(done) as f:
            finished = json.load(f) == settings
    if not finished:
        grpo.main(cfg)
        with open(done, "w") as f:  # last: its presence says the evaluation finished
            json.dump(settings, f, indent=1)
    else:
        print(f"{out}: evaluated before with these settings; read, not run again", flush=True)
    with open(os.path.join(out, "evaluation.jsonl")) as f:
        records = [json.loads(line) for line in f]
    row = {f"pass@{k}": sum(pass_at_k(n, r["correct_samples"], k) for r in records) / len(records) for k in args.ks}
    return {"greedy": sum(r["strict"] for r in records) / len(records), **row, "problems": len(records)}


def plot(results: dict, ks: list[int], path: str) -> None:
    """pass@k against k (log scale), a line for each T, a panel for each model (with matplotlib; else a line says so)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"no {path}: pip install matplotlib to get the figure (the table and JSON are written)", file=sys.stderr)
        return

    fig = Figure(figsize=(5 * len(results), 4))
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for ax, (name, by_T) in zip(axes, results.items()):
        for i, (T, row) in enumerate(by_T.items()):  # markers and dashes apart: equal lines stay visible
            style = dict(marker="os^D"[i % 4], markersize=9 - 2 * (i % 4), linestyle=["-", "--", ":", "-."][i % 4])
            ax.plot(ks, [row[f"pass@{k}"] for k in ks], label=f"T = {T}", **style)
        ax.set(title=name, xlabel="k (samples)", xscale="log", ylim=(-0.02, 1.02))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("pass@k")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="name=model folder or hub id, comma-separated")
    p.add_argument("--dataset", required=True, help="a folder with test.jsonl (as grpo.py's --dataset)")
    p.add_argument("--tools", default="lookup", help="as grpo.py's --tools")
    p.add_argument("--calls", default="0,1,2,4", help="the values of T (--max_tool_calls)")
    p.add_argument("--ks", default="1,2,4,8", help="the values of k; max(k) samples are drawn per question")
    p.add_argument("--eval_size", type=int, default=100)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pass_at_kt")
    args = p.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if any("=" not in pair for pair in args.models.split(",")) or args.eval_size < 1 or min(args.ks) < 1:
        p.error("--models takes name=model pairs (base=HuggingFaceTB/SmolLM2-135M-Instruct,trained=out/final); "
                "--eval_size and every k at least 1")  # fmt: skip
    models = dict(pair.split("=", 1) for pair in args.models.split(","))
    results = {name: {} for name in models}
    for name, model in models.items():
        for T in [int(t) for t in args.calls.split(",")]:
            results[name][T] = measure(model, args, T, os.path.join(args.out, f"{name}-T{T}"))
            print(name, f"T = {T}", json.dumps(results[name][T]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pass_at_kt.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    head = ["model", "T", "greedy"] + [f"pass@{k}" for k in args.ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_T in results.items():
        for T, row in by_T.items():
            lines.append("| " + " | ".join([name, str(T)] + [f"{row[h]:.3f}" for h in head[2:]]) + " |")
    with open(os.path.join(args.out, "pass_at_kt.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, args.ks, os.path.join(args.out, "pass_at_kt.png"))


if __name__ == "__main__":
    main()
