"""bench.py: one GRPO step, phase by phase: grpo.py's own code against the plain path, in one run.

    python bench.py --model PATH --random_init                 # CPU: the SmolLM2-135M shape, P=4, G=8, 64 tokens
    python bench.py --model qwen-shape --random_init --prompts 8 --group_size 8 --prompt_len 200 \\
        --new_tokens 300 --device cuda                          # GPU: the Qwen2.5-0.5B shape (README)

fast  = grpo.py as it trains: grpo.rollout on the sampler (a bf16 copy of the policy under --precision
        bf16, the default on CUDA; each prompt prefilled once, its KV cache shared by its G samples),
        grpo.token_logprobs (prompt cache shared, hidden states projected by the fp32 LM head a chunk
        at a time), grpo.accumulate_gradients (micro-batches).
plain = the straightforward path: model.generate over the P*G repeated prompts with the default
        dynamic cache, then each log-prob pass on the full (B, P+L) sequences with the full fp32
        (B, L, V) log-softmax, one batch; the same grpo_loss and optimizer.
Weights are random (--random_init) and no completion ends early, so both paths do exactly the same
amount of work whatever the weights. Each path runs in its own process, so peak memory (CUDA max
allocated, or peak RSS on CPU) is its own. Prints a table and one JSON line.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import grpo

PHASES = ["prefill", "decode", "rollout", "ref_logp", "policy_fwd_bwd", "optimizer", "step"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device):
    config = AutoConfig.from_pretrained(args.model)
    if args.random_init:  # the real shape with random weights: works on a folder holding only config.json
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.to(device)
    bf16 = grpo.use_bf16(grpo.Config(precision=args.precision), device)
    ref = None
    if args.beta != 0:
        ref = grpo.bf16_copy(model) if bf16 else AutoModelForCausalLM.from_config(config).to(device)
        ref.load_state_dict(model.state_dict())  # as grpo.setup_training keeps it (bf16 weights, fp32 rotary buffers)
        ref.eval().requires_grad_(False)
    return model, ref, config, bf16


def run_path(args) -> dict:
    """Time every phase of one step, args.repeats times after a warmup; medians of each phase."""
    device = torch.device(args.device)
    model, ref, config, bf16 = build(args, device)
    sampler = grpo.bf16_copy(model) if bf16 and args.path == "fast" else model
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    P, G, L, N = args.prompt_len, args.group_size, args.new_tokens, args.prompts
    B = N * G
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, config.vocab_size, (N, P), generator=gen).to(device)
    prompt_mask = torch.ones_like(prompt_ids)
    advantages = torch.randn(B, generator=gen).to(device)
    cfg = grpo.Config(beta=args.beta, max_new_tokens=L, temperature=1.0, precision=args.precision)
    mb = B if args.micro_batch_size < 0 else args.micro_batch_size
    ac = grpo.autocast(device, bf16)
    times = {k: [] for k in PHASES}

    def clock(name, fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times[name].append(time.perf_counter() - t0)
        return out

    def plain_logprobs(m, seq, completion):  # the full fp32 (B, L, V) log-softmax of the whole batch
        logits = m(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, P - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # (B, L)

    def one_step() -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_step = time.perf_counter()
        model.eval()
        if args.path == "fast":  # the sampler computes in its own dtype: no autocast
            eos = [config.vocab_size - 1]
            clock(
                "prefill",
                lambda: grpo.rollout(sampler, prompt_ids, prompt_mask, G, 1, 1.0, eos, 0, ignore_eos=True),
            )
            completion, lengths, _, old_logp, _ = clock(  # pi_old: the sampler's own log-probs
                "rollout",
                lambda: grpo.rollout(sampler, prompt_ids, prompt_mask, G, L, 1.0, eos, 0, ignore_eos=True),
            )
        with ac, torch.no_grad():
            if args.path == "plain":
                ids, mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
                kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
                clock(
                    "prefill",
                    lambda: model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **kw
                    ),
                )
                seq = clock(
                    "rollout",
                    lambda: model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=L, min_new_tokens=L, **kw
                    ),
                )  # min_new_tokens: no EOS
                completion, lengths = seq[:, P:], torch.full((B,), L, device=device)
        times["decode"].append(times["rollout"][-1] - times["prefill"][-1])
        assert completion.shape == (B, L), completion.shape
        model.train()
        with ac, torch.no_grad():
            if args.path == "fast":
                frozen = lambda m: grpo.frozen_logprobs(m, prompt_ids, prompt_mask, completion, mb, 1.0, bf16)  # noqa: E731
            else:
                frozen = lambda m: plain_logprobs(m, seq, completion)  # noqa: E731
            ref_logp = clock("ref_logp", lambda: frozen(ref)) if ref is not None else None
        opt.zero_grad(set_to_none=True)
        if args.path == "fast":
            clock(
                "policy_fwd_bwd",
                lambda: grpo.accumulate_gradients(
                    model, prompt_ids, prompt_mask, completion, lengths, None, advantages, old_logp, ref_logp, cfg, mb
                ),
            )
        else:

            def plain_update():
                with ac:
                    logp = plain_logprobs(model, seq, completion)
                    loss, _ = grpo.grpo_loss(  # mu = 1: pi_old is the current policy
                        logp, logp.detach(), ref_logp, advantages, torch.ones_like(logp), beta=args.beta
                    )
                loss.backward()

            clock("policy_fwd_bwd", plain_update)
        clock(  # the fast path also copies the new weights into its bf16 sampler
            "optimizer",
            lambda: (
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                opt.step(),
                grpo.refresh_sampler(sampler, model),
            ),
        )
        times["step"].append(time.perf_counter() - t_step)

    one_step()  # warmup: allocations, optimizer state, compilation
    for k in times:
        times[k].clear()
    for _ in range(args.repeats):
        one_step()
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "seconds": median,
        "peak_mem_gib": peak,
        "decode_tokens_per_s": B * (L - 1) / median["decode"],
        "params": n_params,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="model folder or hub id (with --random_init: only its config is used)"
    )
    p.add_argument("--random_init", action="store_true", help="random weights of the model's shape")
    p.add_argument("--prompts", type=int, default=4, help="P: distinct prompts per step")
    p.add_argument("--group_size", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompt_len", type=int, default=200, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=64, help="completion tokens, forced (no early EOS)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 = no reference pass")
    p.add_argument("--micro_batch_size", type=int, default=-1, help="fast path micro-batch; -1 = whole batch")
    p.add_argument("--gradient_checkpointing", action="store_true", help="both paths")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as grpo.py's --precision")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warmup (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--bandwidth_gbs", type=float, default=0.0, help="GPU memory bandwidth for the decode roofline (GB/s)"
    )
    p.add_argument("--path", choices=["fast", "plain"], help=argparse.SUPPRESS)  # internal: one path in this process
    args = p.parse_args()
    if args.path:
        print(json.dumps(run_path(args)))
        return

    results = {}
    for path in ("fast", "plain"):  # each in a fresh process: separate peak memory, no shared caches
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--path", path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: the {path} path failed:\n{proc.stderr[-2000:]}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    fast, plain = results["fast"], results["plain"]
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"\nmachine {machine} | model {args.model} ({fast['params'] / 1e6:.1f}M params{', random init' if args.random_init else ''}) | "
        f"P={args.prompts} G={args.group_size} prompt {args.prompt_len} new {args.new_tokens} beta {args.beta}\n"
    )
    print(f"{'phase':<16}{'fast (s)':>12}{'plain (s)':>12}{'plain/fast':>12}")
    ratios = {}
    for k in PHASES:
        if k in fast["seconds"] and k in plain["seconds"]:
            ratios[k] = plain["seconds"][k] / max(fast["seconds"][k], 1e-9)
            print(f"{k:<16}{fast['seconds'][k]:>12.3f}{plain['seconds'][k]:>12.3f}{ratios[k]:>11.2f}x")
    mem_ratio = fast["peak_mem_gib"] / plain["peak_mem_gib"]
    kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(
        f"{'peak mem (GiB)':<16}{fast['peak_mem_gib']:>12.2f}{plain['peak_mem_gib']:>12.2f}   fast/plain {mem_ratio:.2f} ({kind})"
    )
    print(f"{'decode tok/s':<16}{fast['decode_tokens_per_s']:>12.0f}{plain['decode_tokens_per_s']:>12.0f}")
    summary = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k != "path"},
        "fast": fast,
        "plain": plain,
        "speedup": ratios,
        "peak_mem_fast_over_plain": mem_ratio,
    }
    if device.type == "cuda" and args.bandwidth_gbs > 0:  # weights read once per decode step, in bf16
        step_s = fast["seconds"]["decode"] / (args.new_tokens - 1)
        weight_gbs = fast["params"] * 2 / step_s / 1e9
        summary["decode_weight_bandwidth_fraction"] = weight_gbs / args.bandwidth_gbs
        print(
            f"decode: {step_s * 1e3:.2f} ms/step, weights read at {weight_gbs:.0f} GB/s = "
            f"{weight_gbs / args.bandwidth_gbs:.1%} of {args.bandwidth_gbs:.0f} GB/s"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
