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

    python bench.py --memory --model qwen-shape                 # peak GPU memory of the default job, on CPU

--memory predicts the peak GPU memory of one grpo.py training step on CUDA without a GPU: grpo.py's
own code (bf16_copy, setup_training, rollout, frozen_logprobs, accumulate_gradients, clip_and_step,
refresh_sampler) runs on fake tensors (shapes and dtypes, no storage) while torch's MemTracker counts
the live bytes of each kind. Only the model's config is read. Sizes default to grpo.py's defaults.

    python bench.py --job --model qwen-shape --random_init --tokenizer TOK --dataset DATA --device cuda

--job trains --steps steps of the default job (sizes as --memory) twice, each in its own process:
grpo.py's main, and TRL's GRPOTrainer (its transformers generation path) on the same random-weight
model, questions, prompts, rewards, batch and micro-batch, every completion forced to full length in
both. Reports seconds per step and completion tokens per second from the second step on, the peak
memory of each step, and grpo.py's measured peak against --memory's prediction for the same flags.
.ci/gpu runs this and the phase table on a GPU in one go.

    python bench.py --decode_ops --model qwen2.5-0.5b-shape   # ATen ops per decode token, full and LoRA
    python bench.py --head_precision --model M --dataset D     # the LM head's log-probs: fp32, TF32, bf16
    python bench.py --cuda_checks --model qwen-shape --device cuda  # allocator in effect, forced attention kernel
"""

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import grpo

PHASES = ["prefill", "decode", "rollout", "ref_logp", "policy_fwd_bwd", "optimizer", "step"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    """Peak memory in GiB: CUDA max allocated (since the last reset), or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cuda_setup(device: torch.device, precision: str = "auto") -> str:
    """grpo.py's CUDA settings (grpo.setup_cuda: cuDNN attention off, expandable allocator segments, the current
    device, TF32 under bf16) for a part of this benchmark, before its first CUDA allocation, so that every figure
    is measured as grpo.py trains; returns what is in effect, which each part prints beside its figures."""
    if device.type != "cuda":
        return f"cpu: no CUDA settings to make, allocator {allocator_in_effect(device)}"
    grpo.setup_cuda(device, grpo.Config(precision=precision))
    return (f"cuDNN attention {'on' if torch.backends.cuda.cudnn_sdp_enabled() else 'off'}, allocator "
            f"{allocator_in_effect(device)}, fp32 matmuls {torch.backends.cuda.matmul.fp32_precision}")  # fmt: skip


def allocator_in_effect(device: torch.device) -> str:
    """The CUDA allocator's settings as the allocator took them, not as the environment spells them (a setting
    made after the allocator first read it, or one it does not know, reads the same in os.environ): its backend,
    and whether a first allocation's segment is expandable (expandable segments serve the small pool too,
    c10/cuda/CUDACachingAllocator.cpp, Note [Expandable Segments]); where torch exposes it (2.13 on), the string
    it parsed. Makes that first allocation: call it after grpo.setup_cuda."""
    if device.type != "cuda":
        return "the CPU's (no CUDA caching allocator to read)"
    block = torch.empty(1, device=device)  # the first allocation: the allocator reads its settings now
    backend = torch.cuda.memory.get_allocator_backend()  # "native" or "cudaMallocAsync"
    said = ""
    if backend == "native":  # segments are the caching allocator's own; cudaMallocAsync keeps none
        expandable = any(seg.get("is_expandable") for seg in torch.cuda.memory._snapshot()["segments"])
        said = f", expandable segments {'on' if expandable else 'off'}"
    if hasattr(torch._C, "_accelerator_getAllocatorSettings"):  # torch >= 2.13
        said += f", parsed {torch._C._accelerator_getAllocatorSettings()!r}"
    del block
    return backend + said


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


def padded_prompts(N: int, P: int, vocab: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """N random prompts left-padded to P tokens, as grpo.py batches them: the longest fills P, the others are
    shorter by up to a quarter, so that the masked-attention paths run as they do in training."""
    lengths = [P - (i * (P // 4)) // max(1, N - 1) for i in range(N)]  # P down to 3/4 P
    ids = torch.randint(1, vocab, (N, P), generator=gen)
    mask = (torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]).long()  # (N, P): 0 = left padding
    return ids * mask, mask


def run_path(args) -> dict:
    """Time every phase of one step, args.repeats times after a warmup; medians of each phase."""
    device = torch.device(args.device)
    settings = cuda_setup(device, args.precision)  # both paths run with grpo.py's CUDA settings: like against like
    model, ref, config, bf16 = build(args, device)
    sampler = grpo.bf16_copy(model) if bf16 and args.path == "fast" else model
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    _, _, opt, _ = grpo.setup_training(model, grpo.Config(beta=0, lr=1e-6), None, 1, device, bf16)  # grpo.py's AdamW
    P, G, L, N = args.prompt_len, args.group_size, args.new_tokens, args.prompts
    B = N * G
    gen = torch.Generator().manual_seed(1)
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

    def plain_logprobs(m, seq, completion, prompt_mask):  # the full fp32 (B, L, V) log-softmax of the whole batch
        mask = torch.cat([prompt_mask.repeat_interleave(G, 0), torch.ones_like(completion)], 1)
        logits = m(input_ids=seq, attention_mask=mask, use_cache=False).logits[:, -L - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # (B, L)

    def one_step(k: int) -> None:
        # step k's prompts: left-padded, and one token narrower than the last step's, as each training step's batch
        # has a shape of its own, so that whatever a new shape costs (kernel choices, allocations) is timed too
        prompt_ids, prompt_mask = (t.to(device) for t in padded_prompts(N, P - k, config.vocab_size, gen))
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
                completion, lengths = seq[:, -L:], torch.full((B,), L, device=device)
        times["decode"].append(times["rollout"][-1] - times["prefill"][-1])
        assert completion.shape == (B, L), completion.shape
        model.train()
        with ac, torch.no_grad():
            if args.path == "fast":
                frozen = lambda m: grpo.frozen_logprobs(m, prompt_ids, prompt_mask, completion, lengths, mb, 1.0, bf16)  # noqa: E731
            else:
                frozen = lambda m: plain_logprobs(m, seq, completion, prompt_mask)  # noqa: E731
            ref_logp = clock("ref_logp", lambda: frozen(ref)) if ref is not None else None
        opt.zero_grad(set_to_none=True)
        own = grpo.completion_mask(lengths, L)  # (B, L): every token is the model's (forced lengths, no tools)
        if args.path == "fast":
            clock(
                "policy_fwd_bwd",
                lambda: grpo.accumulate_gradients(
                    model, prompt_ids, prompt_mask, completion, lengths, own, advantages, old_logp, ref_logp, cfg, mb
                ),
            )
        else:

            def plain_update():
                with ac:
                    logp = plain_logprobs(model, seq, completion, prompt_mask)
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

    one_step(0)  # warmup: optimizer state, the first kernels
    for k in times:
        times[k].clear()
    for k in range(args.repeats):
        one_step(k + 1)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}
    peak = peak_gib(device)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "seconds": median,
        "peak_mem_gib": peak,
        "decode_tokens_per_s": B * (L - 1) / median["decode"],
        "params": n_params,
        "cuda_settings": settings,
    }


# ----------------------------------------------------------------------------- --sdpa_check and --decode_profile
def sdpa_check(args) -> dict:
    """The cuDNN attention bug that grpo.py avoids (pytorch/pytorch#196678), reduced to one attention call: bf16,
    704 keys (64 mod 128), an explicit causal mask, and every score near -120, so that each row's logsumexp
    lies below -88.7. Counts the non-finite values of grad_q with the attention backends as torch chooses them,
    then with grpo.setup_cuda's choice (on CUDA). Fails only if grpo.py's choice gives one."""
    device = torch.device(args.device)
    L, D = 704, 64

    def non_finite_grad_q() -> int:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, L, D, generator=gen).to(device, torch.bfloat16) for _ in range(3))
        q, k = q * 0.1, k * 0.1
        q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(D)  # q . k / sqrt(D) = -120 for every pair
        for t in (q, k, v):
            t.requires_grad_()
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        out.backward(torch.randn(out.shape, generator=gen).to(device, out.dtype))
        return int((~torch.isfinite(q.grad)).sum())

    torch_default = non_finite_grad_q()
    if device.type == "cuda":
        grpo.setup_cuda(device, grpo.Config(precision="bf16"))
    result = {"machine": machine_name(device), "keys": L, "non_finite_grad_q_torch_default": torch_default,
              "non_finite_grad_q_grpo": non_finite_grad_q()}  # fmt: skip
    print(f"SDPA backward, bf16, {L} keys, explicit mask: non-finite grad_q {torch_default} with torch's default "
          f"backends, {result['non_finite_grad_q_grpo']} with grpo.py's (cuDNN attention off on CUDA)")  # fmt: skip
    return result


def cuda_checks(args) -> dict:
    """What grpo.py's first CUDA minutes rely on, checked after grpo.setup_cuda as grpo.py starts: the allocator
    settings in effect (the segments of a first allocation: expandable or not), and grpo.py's attention calls forced
    onto the memory-efficient kernel, which is what serves them with cuDNN attention off (flash attention takes no
    mask): token_logprobs with its 4-D boolean masks, forward and backward under bf16 autocast, then decode steps of
    rollout with its additive mask. torch raises if the kernel cannot take a call; unforced, it would fall back to
    the math kernel and its (B, heads, Q, K) scores, slow and above --memory's prediction. On a CPU (a rehearsal) the
    math kernel is forced instead, the one a CPU build has for every call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(args.device)
    settings = cuda_setup(device, args.precision)
    result = {"machine": machine_name(device), "cuda_settings": settings}
    if device.type == "cuda":
        block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # a large-pool segment too
        result["expandable_segments"] = [seg.get("is_expandable") for seg in torch.cuda.memory._snapshot()["segments"]]
        del block
    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
    bf16 = grpo.use_bf16(grpo.Config(precision=args.precision), device)
    N, G, L = args.prompts, args.group_size, args.new_tokens
    gen = torch.Generator().manual_seed(1)
    ids, mask = (t.to(device) for t in padded_prompts(N, args.prompt_len, config.vocab_size, gen))
    completion = torch.randint(1, config.vocab_size, (N * G, L), generator=gen).to(device)
    kernel = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(kernel):
        with grpo.autocast(device, bf16):
            logp = grpo.token_logprobs(model, ids, mask, completion, torch.arange(N * G, device=device) // G, 1.0)
        logp.sum().backward()
        sampler = grpo.bf16_copy(model) if bf16 else model
        grpo.rollout(sampler, ids, mask, G, 4, 1.0, [config.vocab_size - 1], 0, ignore_eos=True)
    result.update(forced_kernel=kernel.name, logprobs_finite=bool(torch.isfinite(logp).all()),
                  gradients_finite=all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()))  # fmt: skip
    print(f"after grpo.setup_cuda: {result['cuda_settings']}"
          + (f"; a first allocation's segments expandable: {result['expandable_segments']}" if device.type == "cuda" else "")
          + f"\ntoken_logprobs (forward, backward) and 3 decode steps forced onto {kernel.name}: took them, log-probs "
          f"finite {result['logprobs_finite']}, gradients finite {result['gradients_finite']}")  # fmt: skip
    return result


def decode_profile(args) -> dict:
    """20 decode steps of grpo.rollout on the sampler grpo.py uses, timed, then under the profiler: milliseconds
    per decode step, and the share of the wall time the GPU had no kernel running (host-bound: the CPU did not
    queue work fast enough). Decode steps are the difference of a 21-token and a 1-token rollout."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    settings = cuda_setup(device, args.precision)
    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    sampler = grpo.bf16_copy(model) if grpo.use_bf16(grpo.Config(precision=args.precision), device) else model
    gen = torch.Generator().manual_seed(1)
    ids, mask = (t.to(device) for t in padded_prompts(args.prompts, args.prompt_len, config.vocab_size, gen))
    steps, eos = 20, [config.vocab_size - 1]

    def rollout(tokens: int):
        return grpo.rollout(sampler, ids, mask, args.group_size, tokens, 1.0, eos, 0, ignore_eos=True)

    def wall(tokens: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        rollout(tokens)
        sync(device)
        return time.perf_counter() - t0

    def gpu_seconds(tokens: int) -> float:  # kernel time on the GPU, from the profiler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            rollout(tokens)
            sync(device)
        return kernel_seconds(prof.key_averages())

    rollout(steps + 1)  # warm up: the first kernels, allocations
    decode_wall = min(wall(steps + 1) for _ in range(3)) - min(wall(1) for _ in range(3))
    decode_gpu = gpu_seconds(steps + 1) - gpu_seconds(1) if device.type == "cuda" else float("nan")
    result = {"machine": machine_name(device), "rows": args.prompts * args.group_size, "prompt_len": args.prompt_len,
              "decode_ms_per_step": decode_wall / steps * 1e3, "gpu_busy_ms_per_step": decode_gpu / steps * 1e3,
              "host_bound_share": 1 - decode_gpu / decode_wall if device.type == "cuda" else None,
              "cuda_settings": settings}  # fmt: skip
    print(f"decode, {steps} steps of {result['rows']} rows: {result['decode_ms_per_step']:.2f} ms per step"
          + (f", GPU busy {result['gpu_busy_ms_per_step']:.2f} ms: host-bound share {result['host_bound_share']:.1%}"
             if device.type == "cuda" else " (no GPU: the host-bound share needs one)"))  # fmt: skip
    return result


def kernel_seconds(events) -> float:
    """The GPU's busy time in a profile: self device time summed over the device's own rows (its kernels and
    copies). key_averages() also has a row for each op that launched them, whose self device time repeats its
    kernels': summing every row counts each kernel twice. torch's own table sums as here (profiler_util.py)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched (each one a kernel launch on a GPU, but for views) while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def decode_ops(config, lora_rank: int = 16) -> dict[str, int]:
    """ATen ops per decode token of grpo.rollout, as grpo.py samples under bf16 (the default on CUDA): full fine-tuning
    (the bf16 sampler copy) and LoRA (the policy itself: a bf16 base with fp32 adapters). On a GPU each op is a kernel
    launch of some microseconds on the CPU, so this bounds how fast decoding can go whatever the GPU. One token is
    the difference of a 3-token and a 2-token rollout of 2 prompts x 2 samples, each from a fresh start."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(1, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as in training

    def per_token(sampler) -> int:
        counts = []
        for tokens in (2, 3):
            with OpCounter() as ops:  # each rollout casts the adapters anew (sampling_adapters)
                grpo.rollout(sampler, ids, mask, 2, tokens, 1.0, [config.vocab_size - 1], 0, ignore_eos=True)
            counts.append(ops.count)
        return counts[1] - counts[0]

    full = per_token(grpo.bf16_copy(model))
    grpo.bf16_weights(model)  # as load_model leaves a LoRA base under bf16
    with contextlib.redirect_stdout(sys.stderr):  # add_lora's line
        grpo.add_lora(model, grpo.Config(lora_rank=lora_rank), None)
    return {"layers": config.num_hidden_layers, "full": full, "lora": per_token(model)}


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x (fp32) rounded to TF32's 10-bit mantissa (to nearest), as tensor cores read fp32 matmul inputs under TF32:
    the low 13 of fp32's 23 mantissa bits dropped."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@torch.no_grad()
def head_precision(args) -> dict:
    """The LM head's log-probs three ways, on a real model and its own completions to real questions: exact fp32
    (grpo.py's head_logprobs), TF32 (inputs rounded to a 10-bit mantissa, fp32 accumulation, emulated on the CPU)
    and a bf16 head (bf16 inputs, logits rounded to bf16, as the model's own head under autocast). The hidden states
    come from the body in fp32 and under bf16 autocast (grpo.py's default on CUDA). Errors in nats against exact."""
    model, tok = grpo.load_model(args.model, grpo.Config(), torch.device("cpu"))
    rows = grpo.load_rows(grpo.Config(dataset=args.dataset), "train")[: args.prompts]
    torch.manual_seed(0)
    ro = grpo.generate(model, tok, [r["question"] for r in rows], args.group_size, 1.0,
                       grpo.Config(max_new_tokens=args.new_tokens), torch.device("cpu"))  # fmt: skip
    mask = grpo.completion_mask(ro.lengths, ro.completion_ids.shape[1]).bool()  # (B, L)
    head = model.get_output_embeddings().weight  # (V, H) fp32
    index = torch.arange(len(ro.texts)) // args.group_size
    result = {"model": args.model, "tokens": int(mask.sum())}
    for body in ("fp32", "bf16"):
        hidden = []
        hook = model.base_model.register_forward_hook(lambda m, a, out, seen=hidden: seen.append(out.last_hidden_state))
        with grpo.autocast(torch.device("cpu"), body == "bf16"):
            exact = grpo.token_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, index, 1.0)
        hook.remove()
        # hidden[1] predicts completion tokens 1.. (the prompt's pass, hidden[0], predicts token 0)
        h = torch.cat([hidden[0][:, -1:][index], hidden[1][:, :-1]], 1).float()  # (B, L, H)
        ids = ro.completion_ids
        for name, logits in (("tf32", lambda x: round_to_tf32(x) @ round_to_tf32(head).T),
                             ("bf16", lambda x: (x.bfloat16() @ head.bfloat16().T).float())):  # fmt: skip
            logp = torch.stack([torch.log_softmax(logits(h[b]), -1).gather(-1, ids[b][:, None])[:, 0]
                                for b in range(len(ids))])  # fmt: skip
            error = (logp - exact)[mask].abs()
            result[f"{body}_body_{name}_head"] = {"max": error.max().item(), "mean": error.mean().item(),
                                                  "p99": error.quantile(0.99).item()}  # fmt: skip
    for key, e in result.items():
        if isinstance(e, dict):
            print(f"{key:<24} |log-prob error| against the exact fp32 head: mean {e['mean']:.2e}, 99th percentile "
                  f"{e['p99']:.2e}, max {e['max']:.2e} nats")  # fmt: skip
    return result


# ----------------------------------------------------------------------------- --memory
MEMORY_PHASES = ["setup", "prefill", "decode", "ref_logp", "policy_fwd_bwd", "optimizer"]
CARDS_GB = (16, 24, 40, 80)


class StopDecoding(Exception):
    pass


class StepTracker(MemTracker):
    """MemTracker (live tensor bytes by kind: parameters, buffers, gradients, activations, backward
    temporaries, optimizer state) over one step, with four changes (to its private hooks):
    - it keeps the peak of each phase, with the bytes the KV caches hold at that moment, instead of
      per-module peaks;
    - it answers the reads to Python that a fake tensor cannot (.item(), int(), bool()): with
      ignore_eos every completion runs to L tokens, so an integer read (a length) is L, a finite
      check is True and a metric is 1.0. They decide nothing else here;
    - frozen parameters (sampler, reference, a LoRA base) get no gradient hooks: MemTracker would fail on them;
    - every model call counts as a first call: MemTracker refuses a second call of a model, and a
      rollout calls the sampler once per token."""

    def __init__(self, new_tokens: int, kv_bytes):
        super().__init__()
        self.new_tokens, self.kv_bytes, self.phase, self.peaks = new_tokens, kv_bytes, "setup", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else self.new_tokens
        if func is torch.ops.prim.device.default:  # asked of every tensor in backward; allocates nothing
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state) -> None:  # after every op
        for snap in self._curr_mem_snap.values():  # one device
            if snap["Total"] > self.peaks.get(self.phase, {}).get("Total", -1):
                self.peaks[self.phase] = {getattr(k, "name", k): v for k, v in snap.items()} | {"KV": self.kv_bytes()}

    def _pre_fw_hook(self, module, inputs) -> None:
        if not self._mod_tracker.is_bw:  # in backward it is a checkpointed layer's recompute: keep it
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # frozen parameters (a LoRA layer's base weight beside its adapters) count as hooked already
        frozen = [p for p in module.parameters() if not p.requires_grad and p not in self._param_to_grad_hook_handles]
        self._param_to_grad_hook_handles.update(dict.fromkeys(frozen, ()))
        try:
            trainable = any(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)
        finally:
            for p in frozen:
                del self._param_to_grad_hook_handles[p]


# Qwen2.5 shapes from the models' public config.json files (random weights are enough to predict memory):
# bench.py --memory --model qwen2.5-7b-shape needs no download.
QWEN25_SHAPES = {
    "qwen2.5-0.5b-shape": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b-shape": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                               intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b-shape": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                             intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b-shape": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip


def model_config(name: str):
    """A model folder's or hub id's config, or one of QWEN25_SHAPES."""
    if name in QWEN25_SHAPES:
        from transformers import Qwen2Config

        return Qwen2Config(**QWEN25_SHAPES[name], rope_theta=1e6, max_position_embeddings=32768)
    return AutoConfig.from_pretrained(name)


def param_bytes(model) -> int:
    return 0 if model is None else sum(p.nbytes for p in model.parameters())  # tied weights counted once


def predict_memory(args) -> dict:
    """One steady-state training step of grpo.py (grpo_step's phases, mu = 1, one process) as it
    runs on CUDA, on fake tensors: per-phase peaks (bytes by kind) and the numbers to read them by.

    The fake tensors live on the CPU under CPU bf16 autocast: fake CUDA tensors do not work in a
    CPU-only torch (autocast('cuda') turns itself off without CUDA, and attention with a mask
    aborts). AdamW is fused, as setup_training makes it on every device. Its state exists before the step,
    as from the job's second step on: a first AdamW step on zero gradients makes it during setup.
    The first decode_steps decode steps run; each later one only adds one token per row to the KV
    cache (no other tensor outlives a step), which is added to the decode peak. Micro-batches are alike (same
    shapes, same live tensors): the first allocates the gradients, the second is the steady state every later one
    repeats, so the reference and update passes run on the rows of the first micro_batches_run micro-batches
    (whole prompts); each other micro-batch would add only its rows of the (B, L) log-probs and mask."""
    config = model_config(args.model)
    bf16 = args.precision != "fp32"  # auto is bf16 on CUDA, the machine predicted here
    N, G, P, L = args.prompts, args.group_size, args.prompt_len, args.new_tokens
    B = N * G
    mb = B if args.micro_batch_size < 0 else min(args.micro_batch_size, B)
    cfg = grpo.Config(prompts_per_step=N, group_size=G, max_new_tokens=L, micro_batch_size=mb, beta=args.beta,
                      precision="bf16" if bf16 else "fp32", gradient_checkpointing=args.gradient_checkpointing,
                      lora_rank=args.lora_rank)  # fmt: skip
    device = torch.device("cpu")
    k = L if args.decode_steps < 0 else min(max(args.decode_steps, 1), L)
    n = B if args.micro_batches_run < 0 else min(B, -(-max(args.micro_batches_run, 1) * mb // G) * G)  # rows run
    caches, at_stop, steps = weakref.WeakSet(), {}, 0

    def new_cache(**kw):  # grpo's DynamicCache, remembered so that kv_bytes can find it
        cache = DynamicCache(**kw)
        caches.add(cache)
        return cache

    def kv_bytes() -> int:
        layers = [layer for cache in caches for layer in cache.layers]
        return sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))

    def sample(logits, temperature):  # grpo.sample, called once per decode step: marks the phase, stops at k
        nonlocal steps
        tracker.phase, steps = "decode", steps + 1
        if steps > k:
            at_stop["kv"] = kv_bytes()  # the cache now holds P + k tokens of every row
            raise StopDecoding
        return real_sample(logits, temperature)

    real_sample = grpo.sample
    warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")  # deepcopy asks; fake has none
    fake = FakeTensorMode()
    fake.__deepcopy__ = lambda memo: fake  # bf16_copy deep-copies the model: its copy stays in this mode
    t0 = time.perf_counter()
    with fake:  # the model as grpo.load_model has it on the host, before it moves to the GPU: fp32, a LoRA base bf16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if cfg.lora_rank and bf16:
            grpo.bf16_weights(model)
    with (
        fake,
        StepTracker(L, kv_bytes) as tracker,
        mock.patch.object(grpo, "DynamicCache", new_cache),
        mock.patch.object(grpo, "sample", sample),
    ):
        # setup, as grpo.main: the model moves to the GPU; fp32 policy, bf16 sampler, reference and AdamW
        # (setup_training); with LoRA the policy (a bf16 base with fp32 adapters) is its own sampler and, adapters
        # off, its own reference
        tracker.track_external(model)
        sampler = grpo.bf16_copy(model) if bf16 and not cfg.lora_rank else model
        policy, ref, optimizer, _ = grpo.setup_training(model, cfg, None, 1, device, bf16)  # fused, as on every device
        tracker.track_external(model, sampler, ref)  # made under the tracker: labelled activations so far
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the step: rollout -> reference log-probs -> update (grpo_step)
        tracker.phase = "prefill"
        prompt_ids = torch.randint(0, config.vocab_size, (N, P))
        prompt_mask = torch.ones_like(prompt_ids)
        advantages = torch.zeros(B)
        sampler.eval()
        try:
            completion, lengths, _, sample_logp, by_env = grpo.rollout(
                sampler, prompt_ids, prompt_mask, G, L, 1.0, [0], 0, ignore_eos=True
            )
        except StopDecoding:  # after k of L decode steps: the rest of the rollout's outputs, same shapes
            completion, lengths = torch.randint(0, config.vocab_size, (B, L)), torch.full((B,), L)
            sample_logp, by_env = torch.zeros(B, L), torch.zeros(B, L, dtype=torch.bool)
        model.train()
        tracker.phase = "ref_logp"
        rows, prompts = slice(0, n), slice(0, n // G)  # the micro-batches that run (views: nothing allocated)
        args_ = (prompt_ids[prompts], prompt_mask[prompts], completion[rows], lengths[rows])
        ref_logp = grpo.frozen_logprobs(ref, *args_, mb, 1.0, bf16) if ref is not None else None
        tracker.phase = "policy_fwd_bwd"
        optimizer.zero_grad(set_to_none=True)
        own = grpo.completion_mask(lengths[rows], L, by_env[rows])  # (n, L) the model's own tokens
        stats = grpo.accumulate_gradients(policy, *args_, own, advantages[rows], sample_logp[rows], ref_logp, cfg, mb, 1)  # fmt: skip
        tracker.phase = "optimizer"
        grpo.clip_and_step(model, optimizer, stats["loss"][0], cfg.max_grad_norm, 1)
        grpo.refresh_sampler(sampler, model)
        sizes = {
            "weights": param_bytes(model),
            "sampler": param_bytes(sampler) if sampler is not model else 0,
            "reference": param_bytes(ref) if ref is not model else 0,
            "optimizer_state": sum(t.nbytes for state in optimizer.state.values() for t in state.values()),
            "gradients": sum(p.nbytes for p in model.parameters() if p.requires_grad),  # fp32, as the weights
        }
        n_params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - t0
    kv_per_token = at_stop["kv"] // (P + k) if at_stop else 0  # bytes per token of all B rows
    if at_stop:
        tracker.peaks["decode"]["Total"] += (L - k) * kv_per_token
        tracker.peaks["decode"]["KV"] += (L - k) * kv_per_token
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    kv_analytic = 2 * layers * B * (P + L) * kv_heads * head_dim * (2 if bf16 else 4)  # K and V, every row and slot
    return {
        "peaks": tracker.peaks, "sizes": sizes, "params": n_params, "decode_steps_run": k, "micro_batches_run": -(-n // mb),
        "kv_bytes_per_token": kv_per_token, "kv_cache_analytic_bytes": kv_analytic, "seconds": seconds,
        "micro_batch_size": mb, "bf16": bf16,
    }  # fmt: skip


def breakdown(snap: dict, sizes: dict) -> dict[str, int]:
    """A phase's peak by kind, in bytes; the kinds add up to its total. Parameters are split by model,
    the optimizer's bytes into its state and its step's temporaries, activations into KV cache and rest."""
    params, out = snap["PARAM"], {}
    for name in ("weights", "sampler", "reference"):  # the models' own sizes, as far as labelled parameters go
        out[name] = min(params, sizes[name])
        params -= out[name]
    out["buffers"] = snap["BUFFER"]
    out["gradients"] = snap["GRAD"]
    out["optimizer_state"] = min(snap["OPT"], sizes["optimizer_state"])
    out["optimizer_temporaries"] = snap["OPT"] - out["optimizer_state"]
    out["kv_cache"] = snap["KV"]
    out["activations"] = snap["ACT"] - snap["KV"]  # KV tensors are made in forward: MemTracker calls them activations
    out["backward_temporaries"] = snap["TEMP"]
    out["other"] = snap["OTH"] + params
    return out


def report_memory(args, result: dict) -> None:
    GiB = 2**30
    peaks = result["peaks"]
    peak_phase = max(peaks, key=lambda k: peaks[k]["Total"])
    total = peaks[peak_phase]["Total"]
    parts = breakdown(peaks[peak_phase], result["sizes"])
    B, k, L = args.prompts * args.group_size, result["decode_steps_run"], args.new_tokens
    all_micro_batches = -(-B // result["micro_batch_size"])
    print(
        f"\npredicted peak GPU memory of one grpo.py training step on CUDA | model {args.model} "
        f"({result['params'] / 1e6:.1f}M params) | P={args.prompts} G={args.group_size} (B={B}) prompt "
        f"{args.prompt_len} new {L} | micro-batch {result['micro_batch_size']} | beta {args.beta} | "
        f"{'bf16' if result['bf16'] else 'fp32'} | gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
        f" | {f'LoRA rank {args.lora_rank}' if args.lora_rank else 'full fine-tuning'}"
    )
    print(
        "grpo.py's own code on fake tensors (no storage) of device cpu, CPU bf16 autocast standing in for CUDA's\n"
        "(fake CUDA tensors need a CUDA build of torch); torch's MemTracker counts the live bytes of each kind\n"
    )
    print(f"{'phase':<16}{'peak GiB':>10}")
    for name in MEMORY_PHASES:
        if name in peaks:
            note = "   <- peak" if name == peak_phase else ""
            if name == "decode" and k < L:
                note += f"   (ran {k} of {L} steps; the other {L - k} add {(L - k) * result['kv_bytes_per_token'] / GiB:.2f} GiB of KV cache, counted)"
            if name in ("ref_logp", "policy_fwd_bwd") and result["micro_batches_run"] < all_micro_batches:
                note += (
                    f"   (ran {result['micro_batches_run']} of {all_micro_batches} micro-batches; the rest are alike)"
                )
            print(f"{name:<16}{peaks[name]['Total'] / GiB:>10.2f}{note}")
    labels = {
        "weights": "weights (bf16 base + fp32 LoRA)" if args.lora_rank else "weights (fp32 policy)",
        "sampler": "sampler copy (bf16)", "reference": "reference copy",
        "buffers": "buffers (rotary)", "gradients": "gradients (fp32)", "optimizer_state": "AdamW state (fp32)",
        "optimizer_temporaries": "AdamW step temporaries", "kv_cache": "KV cache", "activations": "activations",
        "backward_temporaries": "backward temporaries", "other": "other",
    }  # fmt: skip
    print(f"\n{'at the peak (' + peak_phase + ')':<34}{'GiB':>8}{'GB':>9}")
    for name, n in parts.items():
        print(f"  {labels[name]:<32}{n / GiB:>8.2f}{n / 1e9:>9.2f}")
    print(f"  {'total':<32}{total / GiB:>8.2f}{total / 1e9:>9.2f}")
    print(
        f"KV cache of the rollout at full length: analytic 2*layers*B*(P+L)*kv_heads*head_dim*bytes = "
        f"{result['kv_cache_analytic_bytes'] / GiB:.2f} GiB, counted {peaks['decode']['KV'] / GiB:.2f} GiB "
        f"(the last token's keys are never computed)"
    )
    fits = {}
    for gb in CARDS_GB:
        fits[gb] = "fits" if total <= 0.85 * gb * GiB else "tight" if total <= gb * GiB else "no"
    print(
        "\ncards: a card sold as N GB has N GiB of memory, a little less usable (79.2 GiB on an 80 GB H100). "
        "fits = peak <= 0.85 N GiB (room for the CUDA context, allocator fragmentation, kernel workspaces); "
        "tight = peak <= N GiB, may run out"
    )
    print("  " + " | ".join(f"{gb} GB: {v}" for gb, v in fits.items()))
    print(
        "\nnot seen here: the CUDA caching allocator's rounding and fragmentation (reserved memory runs above\n"
        "allocated, more so as the KV cache grows a token at a time; grpo.py sets PYTORCH_ALLOC_CONF=expandable_segments:True\n"
        "helps); the CUDA context (~0.3-0.5 GiB) and kernel workspaces (cuBLAS, attention); CPU kernels and CPU\n"
        "autocast stand in for CUDA's and can allocate differently (attention here is CPU flash attention: it keeps no\n"
        "(L, L) scores, as CUDA's flash / memory-efficient kernels); under torchrun, DDP's buckets as above.\n"
        f"Host reads were answered, not computed (lengths L, finite checks true, metrics 1). Ran in {result['seconds']:.0f} s.\n"
    )
    # torchrun: DDP keeps the gradients in its buckets (gradient_as_bucket_view), which exist from the first step on,
    # so a rank holds them in every phase, the rollout and reference pass included, where one process holds none
    grads = result["sizes"]["gradients"]
    rank = {name: p["Total"] - p["GRAD"] + grads for name, p in peaks.items() if name != "setup"}
    rank_phase = max(rank, key=rank.get)
    first = peaks["policy_fwd_bwd"]["Total"] + grads  # step 1: fresh gradients beside the buckets, until the last
    print(  # micro-batch's reduction makes them views
        f"torchrun, per rank: DDP's gradient buckets ({grads / GiB:.2f} GiB) live through every phase: peak "
        f"{rank[rank_phase] / GiB:.2f} GiB ({rank_phase}); the first step, before the gradients become views of the "
        f"buckets, {first / GiB:.2f} GiB. DDP's own small state (its bucket index, communication buffers) not modelled"
    )  # fmt: skip
    summary = {
        "peak_gib": total / GiB, "peak_bytes": total, "peak_phase": peak_phase,
        "torchrun_rank_peak_gib": rank[rank_phase] / GiB, "torchrun_first_step_peak_gib": first / GiB,
        "breakdown_bytes": parts, "phase_peak_gib": {name: peaks[name]["Total"] / GiB for name in peaks},
        "phase_kv_cache_bytes": {name: peaks[name]["KV"] for name in peaks},
        "kv_cache_analytic_bytes": result["kv_cache_analytic_bytes"], "params": result["params"],
        "decode_steps_run": k, "micro_batches_run": result["micro_batches_run"], "fits": {f"{gb}GB": v for gb, v in fits.items()}, "seconds": result["seconds"],
        "args": {key: v for key, v in vars(args).items() if key != "path"},
    }  # fmt: skip
    print(json.dumps(summary))


# ----------------------------------------------------------------------------- --job: training steps, grpo.py and TRL
def job_rows(args, tok) -> tuple[list[dict], int]:
    """The questions of the job's steps, in grpo.py's order (TRL gets the same, unshuffled), and the longest
    step's prompt length in tokens (prompts are left-padded to it)."""
    rows = grpo.load_rows(grpo.Config(dataset=args.dataset), "train")
    P = args.prompts
    chosen = [rows[i] for i in grpo.prompt_indices(len(rows), 0, P * args.steps, grpo.Config().seed)]
    lengths = [len(tok(grpo.build_prompt(tok, r["question"]), add_special_tokens=False).input_ids) for r in chosen]
    return chosen, max(max(lengths[i : i + P]) for i in range(0, len(lengths), P))


def print_mark(device, mean_length: float) -> None:
    """One line per training step, printed as it ends: the time, the peak memory since the last step's end
    (CUDA max allocated; on CPU the process's peak RSS) and the step's mean completion length."""
    sync(device)
    peak = peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps({"t": time.perf_counter(), "peak_gib": peak, "length": mean_length}), flush=True)


def run_grpo_job(args) -> None:
    """grpo.main on the job's flags (no evaluation, no checkpoints), each completion forced to full length."""
    device = torch.device(args.device)
    cfg = grpo.Config(model=args.job_model, dataset=args.dataset, output_dir=os.path.join(args.job_dir, "grpo-out"),
                      steps=args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
                      max_new_tokens=args.new_tokens, beta=args.beta, micro_batch_size=args.micro_batch_size,
                      precision=args.precision, gradient_checkpointing=args.gradient_checkpointing, eval_size=0,
                      save_every=0, sample_every=0, device=args.device)  # fmt: skip
    print(json.dumps({"trainer": "grpo.py", "cuda_settings": "grpo.py's own (setup_cuda)"}), flush=True)

    def on_step(step, model, metrics, sums):
        print_mark(device, metrics["completion_len"])
        check_job_step(step, metrics)

    with mock.patch.object(grpo, "eos_ids", lambda model, tok: [-1]):  # no token ends a completion
        grpo.main(cfg, on_step=on_step)


def check_job_step(step: int, metrics: dict) -> None:
    """A measurement of a broken run is no measurement: stop at once, loudly, on a skipped update or a
    non-finite metric. (With random weights the job cannot meet the cuDNN attention NaN, which needs Qwen's
    real activations: --sdpa_check is that check.)"""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if metrics.get("skipped_updates") or bad:
        sys.exit(f"error: grpo.py's step {step}: {metrics.get('skipped_updates', 0):.0f} updates skipped as "
                 f"non-finite; non-finite metrics: {', '.join(bad) or 'none'}")  # fmt: skip


def trl_reward(fn, max_tokens: int):
    """grpo.py's reward function in TRL's signature, given every keyword grpo.py's score gives it: TRL passes the
    dataset's columns and each completion's token ids (completion_ids), cut after its EOS."""

    def reward(prompts, completions, completion_ids, gold, question, **kwargs):
        return [fn(c, g, question=q, tokens=len(ids), max_tokens=max_tokens)
                for c, ids, g, q in zip(completions, completion_ids, gold, question)]  # fmt: skip

    reward.__name__ = fn.__name__
    return reward


def run_trl_job(args) -> None:
    """TRL's GRPOTrainer on the same model, questions, prompts, rewards and sizes, on its transformers generation
    path (model.generate, no vLLM): G completions per question, micro-batches of the same size accumulated to the
    same batch, one generation per optimizer step, beta, the grpo loss, bf16 autocast over fp32 weights as grpo.py
    (--precision), each completion forced to full length (min_new_tokens)."""
    device = torch.device(args.device)
    settings = cuda_setup(device, args.precision)  # TRL trains with grpo.py's CUDA settings: like against like
    import datasets  # after the CUDA settings: nothing that TRL or accelerate do on import comes before them
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    print(json.dumps({"trainer": f"TRL {trl.__version__}", "cuda_settings": settings}), flush=True)
    tok = AutoTokenizer.from_pretrained(args.job_model)
    rows, _ = job_rows(args, tok)
    data = datasets.Dataset.from_list(
        [{"prompt": grpo.build_prompt(tok, r["question"]), "gold": r["gold"], "question": r["question"]} for r in rows]
    )

    B = args.prompts * args.group_size
    mb = B if args.micro_batch_size < 0 else min(args.micro_batch_size, B)
    config = trl.GRPOConfig(
        output_dir=os.path.join(args.job_dir, "trl-out"), max_steps=args.steps, per_device_train_batch_size=mb,
        gradient_accumulation_steps=B // mb, num_generations=args.group_size, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, loss_type="grpo", epsilon=0.2, scale_rewards="group", num_iterations=1,
        use_bias_correction_kl=False,  # TRL's default multiplies the k3 KL by pi_theta/pi_old; grpo.py's is the paper's
        learning_rate=grpo.Config().lr, lr_scheduler_type="constant", adam_beta2=0.99, max_grad_norm=1.0,
        bf16=grpo.use_bf16(grpo.Config(precision=args.precision), device), use_cpu=device.type == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, model_init_kwargs={"dtype": torch.float32},
        reward_weights=[w for _, w in grpo.REWARD_FUNCS], shuffle_dataset=False, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, disable_dropout=True,
    )  # fmt: skip

    class Marks(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kwargs):  # logged at the end of every step
            if logs and "completions/mean_length" in logs:
                print_mark(device, logs["completions/mean_length"])

    trainer = trl.GRPOTrainer(model=args.job_model, reward_funcs=[trl_reward(fn, args.new_tokens) for fn, _ in grpo.REWARD_FUNCS],
                              args=config, train_dataset=data, processing_class=tok, callbacks=[Marks()])  # fmt: skip
    trainer.train()


def job_result(stdout: str, args, timed_out: bool, trainer: str) -> dict:
    """Seconds and peak memory of each step after the first (which also loads and warms up), from the lines
    the job printed as its steps ended, and completion tokens per second (every completion ran to full length)."""
    lines = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):  # other lines: the trainers' own logs
            lines.append(json.loads(line))
    lines = [m for m in lines if isinstance(m, dict)]
    marks = [m for m in lines if "t" in m]
    name = next((m["trainer"] for m in lines if "trainer" in m), trainer)
    settings = next((m["cuda_settings"] for m in lines if "cuda_settings" in m), "")
    seconds = [b["t"] - a["t"] for a, b in zip(marks, marks[1:])]
    median = statistics.median(seconds) if seconds else float("nan")
    return {"trainer": name, "cuda_settings": settings, "steps_done": len(marks), "timed_out": timed_out, "step_seconds": seconds,
            "median_step_seconds": median, "completion_tokens_per_s": args.prompts * args.group_size * args.new_tokens / median,
            "peak_gib": max((m["peak_gib"] for m in marks[1:]), default=float("nan")),
            "mean_completion_length": [m["length"] for m in marks]}  # fmt: skip


def run_jobs(args) -> None:
    """--job: a random-weight model folder of the shape (or the model itself), then each trainer in a process of
    its own (at most --job_timeout seconds each), while another predicts grpo.py's peak for the same flags
    (bench.py --memory, on the CPU); one table."""
    import tempfile

    from transformers import AutoTokenizer

    device = torch.device(args.device)
    args.job_dir = args.job_dir or tempfile.mkdtemp(prefix="bench-job-")
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    _, longest = job_rows(args, tok)
    args.job_model = args.model
    if args.random_init:  # random weights of the shape, saved with the tokenizer for grpo.py and TRL to load
        torch.manual_seed(0)
        args.job_model = os.path.join(args.job_dir, "model")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32)
        model.save_pretrained(args.job_model)
        tok.save_pretrained(args.job_model)
        del model
    flags = ["--prompts", str(args.prompts), "--group_size", str(args.group_size), "--new_tokens", str(args.new_tokens),
             "--beta", str(args.beta), "--micro_batch_size", str(args.micro_batch_size), "--precision", args.precision]  # fmt: skip
    flags += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    trainers = args.trainers.split(",")
    predict = None
    if "grpo" in trainers:  # as on CUDA (auto = bf16), whatever --device: it predicts a GPU's memory
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory",
            "--model",
            args.model,
            "--prompt_len",
            str(longest),
        ]
        predict = subprocess.Popen([*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for trainer in trainers:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--dataset", args.dataset,
               "--steps", str(args.steps), "--device", args.device, *flags, "--job_dir", args.job_dir,
               "--job_model", args.job_model, "--path", f"job_{trainer}"]  # fmt: skip
        try:  # a failure or a timeout keeps the steps it finished, and the next trainer still runs
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout or None)
            out, timed_out, failed = proc.stdout, False, proc.returncode != 0
            if failed:
                print(f"the {trainer} job failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        except subprocess.TimeoutExpired as e:
            out, timed_out, failed = (
                (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or "",
                True,
                False,
            )
        results[trainer] = job_result(out, args, timed_out, trainer) | {"failed": failed}
    predicted = None
    if predict is not None:
        try:  # it ran beside the jobs; it takes under a minute on a CPU
            out, err = predict.communicate(timeout=max(60, args.job_timeout))
        except subprocess.TimeoutExpired:
            predict.kill()
            out, err = predict.communicate()
            err += "\ntimed out"
        if predict.returncode == 0:
            predicted = json.loads(out.strip().splitlines()[-1])["peak_gib"]
        else:  # the measurements stand without it
            print(f"the memory prediction failed:\n{err[-3000:]}", file=sys.stderr)
    machine = machine_name(device)
    print(f"\nmachine {machine} | model {args.model}{' (random weights)' if args.random_init else ''} | P={args.prompts} "
          f"G={args.group_size} prompts up to {longest} tokens, {args.new_tokens} new (forced) | micro-batch "
          f"{args.micro_batch_size} | beta {args.beta} | {args.precision} | {args.steps} steps, timed from the 2nd\n")  # fmt: skip
    kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(
        f"{'trainer':<14}{'s/step':>10}{'tokens/s':>12}{'peak GiB':>10}  {'steps':<16}mean completion length ({kind})"
    )
    for r in results.values():
        lengths = ", ".join(f"{x:.0f}" for x in r["mean_completion_length"])
        done = f"{r['steps_done']}{' (timed out)' if r['timed_out'] else ' (failed)' if r['failed'] else ''}"
        print(f"{r['trainer']:<14}{r['median_step_seconds']:>10.2f}{r['completion_tokens_per_s']:>12.0f}"
              f"{r['peak_gib']:>10.2f}  {done:<16}{lengths}")  # fmt: skip
    for r in results.values():
        print(f"{r['trainer']} CUDA settings: {r['cuda_settings'] or 'not reported'}")
    summary = {"machine": machine, "prompt_len_longest": longest, "predicted_peak_gib": predicted, **results,
               "args": {k: v for k, v in vars(args).items() if k != "path"}}  # fmt: skip
    if predicted is not None and "grpo" in results:
        print(f"\nbench.py --memory predicts grpo.py's peak at {predicted:.2f} GiB on CUDA for the same flags (prompts of "
              f"{longest} tokens)" + (f": measured / predicted = {results['grpo']['peak_gib'] / predicted:.3f}" if device.type == "cuda" else ""))  # fmt: skip
        summary["grpo_peak_over_predicted"] = results["grpo"]["peak_gib"] / predicted if device.type == "cuda" else None
    if "grpo" in results and "trl" in results:
        ratio = results["trl"]["median_step_seconds"] / results["grpo"]["median_step_seconds"]
        print(f"TRL s/step / grpo.py s/step = {ratio:.2f}")
        summary["trl_over_grpo_step_time"] = ratio
    print(json.dumps(summary))
    if any(r["failed"] for r in results.values()):
        sys.exit(1)


def main() -> None:
    cfg = grpo.Config()  # --memory predicts the job grpo.py runs by default
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="model folder or hub id (with --random_init: only its config is used)"
    )
    p.add_argument("--random_init", action="store_true", help="random weights of the model's shape")
    p.add_argument("--prompts", type=int, help=f"P: distinct prompts per step (4; --memory {cfg.prompts_per_step})")
    p.add_argument("--group_size", type=int, help=f"G: samples per prompt (8; --memory {cfg.group_size})")
    p.add_argument("--prompt_len", type=int, default=200, help="prompt tokens")
    p.add_argument(
        "--new_tokens", type=int, help=f"completion tokens, no early EOS (64; --memory {cfg.max_new_tokens})"
    )
    p.add_argument("--beta", type=float, help=f"KL weight; 0 = no reference pass (0.04; --memory {cfg.beta})")
    p.add_argument(
        "--micro_batch_size", type=int, help=f"micro-batch; -1 = whole batch (-1; --memory {cfg.micro_batch_size})"
    )
    p.add_argument("--gradient_checkpointing", action="store_true", help="both paths")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as grpo.py's; --memory: auto = bf16"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warmup (median reported)")
    p.add_argument("--path_timeout", type=int, default=0, help="seconds per path of the phase table (0 = no limit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--bandwidth_gbs", type=float, default=0.0, help="GPU memory bandwidth for the decode roofline (GB/s)"
    )
    p.add_argument("--memory", action="store_true", help="predict the peak GPU memory of one step, on CPU")
    p.add_argument("--lora_rank", type=int, default=0, help="--memory: as grpo.py's (0 = full fine-tuning)")
    p.add_argument("--sdpa_check", action="store_true", help="the cuDNN attention NaN, torch's backends vs grpo.py's")
    p.add_argument("--decode_profile", action="store_true", help="decode ms per step and the host-bound share")
    p.add_argument("--decode_ops", action="store_true", help="ATen ops per decode token, full and LoRA, on CPU")
    p.add_argument("--head_precision", action="store_true", help="the LM head's log-probs: fp32, TF32, bf16 (CPU)")
    p.add_argument(
        "--cuda_checks", action="store_true", help="the allocator in effect; attention forced onto mem-efficient"
    )
    p.add_argument(
        "--decode_steps", type=int, default=16, help="--memory: decode steps run; the rest are counted; -1 = all"
    )
    p.add_argument(
        "--micro_batches_run", type=int, default=2, help="--memory: micro-batches run; the rest are alike; -1 = all"
    )
    p.add_argument("--job", action="store_true", help="train --steps steps with grpo.py and TRL (--trainers)")
    p.add_argument("--trainers", default="grpo,trl", help="--job: grpo, trl or both (comma-separated)")
    p.add_argument("--dataset", default="openai/gsm8k", help="--job: the questions, as grpo.py's --dataset")
    p.add_argument("--tokenizer", help="--job --random_init: a tokenizer folder, if --model holds only a config")
    p.add_argument("--steps", type=int, default=6, help="--job: steps per trainer; the first is not timed")
    p.add_argument("--job_timeout", type=int, default=0, help="--job: seconds per trainer, then its steps so far")
    p.add_argument("--job_dir", default="", help="--job: where the model and the runs are written (a temp folder)")
    p.add_argument("--job_model", help=argparse.SUPPRESS)  # internal: the model folder the jobs train
    p.add_argument("--path", choices=["fast", "plain", "job_grpo", "job_trl"], help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    defaults = {"prompts": 4, "group_size": 8, "new_tokens": 64, "beta": 0.04, "micro_batch_size": -1}
    if args.memory or args.job:
        defaults = {"prompts": cfg.prompts_per_step, "group_size": cfg.group_size, "new_tokens": cfg.max_new_tokens,
                    "beta": cfg.beta, "micro_batch_size": cfg.micro_batch_size}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.memory:
        report_memory(args, predict_memory(args))
        return
    if args.sdpa_check:
        result = sdpa_check(args)
        print(json.dumps(result))
        if result["non_finite_grad_q_grpo"]:
            sys.exit("error: grpo.py's attention setting gives a non-finite grad_q")
        return
    if args.decode_ops:
        ops = decode_ops(model_config(args.model))
        print(f"ATen ops per decode token, {args.model} ({ops['layers']} layers, bf16 sampling as on CUDA): full "
              f"fine-tuning {ops['full']}, LoRA rank 16 {ops['lora']} ({ops['lora'] / ops['full']:.2f}x)")  # fmt: skip
        print(json.dumps(ops))
        return
    if args.decode_profile:
        print(json.dumps(decode_profile(args)))
        return
    if args.head_precision:
        print(json.dumps(head_precision(args)))
        return
    if args.cuda_checks:
        result = cuda_checks(args)
        print(json.dumps(result))
        expandable = all(result.get("expandable_segments") or [True])  # on CUDA, every segment
        if not (result["logprobs_finite"] and result["gradients_finite"] and expandable):
            sys.exit("error: a CUDA check failed (above)")
        return
    if args.path in ("job_grpo", "job_trl"):
        run_grpo_job(args) if args.path == "job_grpo" else run_trl_job(args)
        return
    if args.job:
        run_jobs(args)
        return
    if args.path:
        print(json.dumps(run_path(args)))
        return
    phase_table(args)


def phase_table(args) -> None:
    """The two paths' phases, a row per path printed as the path ends, their ratios, and one JSON line; exits
    non-zero if a path failed or ran out of time."""
    device = torch.device(args.device)
    machine = machine_name(device)
    print(f"\nmachine {machine} | model {args.model}{' (random init)' if args.random_init else ''} | P={args.prompts} "
          f"G={args.group_size} prompt {args.prompt_len} new {args.new_tokens} beta {args.beta} | seconds per phase, "
          f"peak memory ({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'}), decode tokens/s\n")  # fmt: skip
    columns = [*PHASES, "peak GiB", "decode tok/s"]
    widths = [max(len(c), 8) + 2 for c in columns]
    print(f"{'path':<12}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)), flush=True)
    results = {}
    for path in ("fast", "plain"):  # a row each, printed as it ends: a failed or timed-out path is a row too
        results[path] = result = path_result(args, path)
        if "error" in result:
            print(f"{path:<12}  {result['error']}", flush=True)
            continue
        cells = [*(result["seconds"][k] for k in PHASES), result["peak_mem_gib"], result["decode_tokens_per_s"]]
        digits = [3] * (len(columns) - 1) + [0]
        print(f"{path:<12}" + "".join(f"{v:>{w}.{d}f}" for v, w, d in zip(cells, widths, digits)), flush=True)
    fast, plain = results["fast"], results["plain"]
    both = "error" not in fast and "error" not in plain
    ratios = {k: plain["seconds"][k] / max(fast["seconds"][k], 1e-9) for k in PHASES} if both else {}
    if both:
        cells = [*ratios.values(), plain["peak_mem_gib"] / fast["peak_mem_gib"]]
        print(f"{'plain/fast':<12}" + "".join(f"{v:>{w - 1}.2f}x" for v, w in zip(cells, widths)))
    for result in (fast, plain):
        if "error" not in result:
            print(f"{result['params'] / 1e6:.1f}M params | {result['cuda_settings']}")
            break
    summary = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k != "path"},
        "fast": fast,
        "plain": plain,
        "speedup": ratios,
        "peak_mem_fast_over_plain": fast["peak_mem_gib"] / plain["peak_mem_gib"] if both else None,
    }
    if device.type == "cuda" and args.bandwidth_gbs > 0 and "error" not in fast:  # weights read once per step, bf16
        step_s = fast["seconds"]["decode"] / (args.new_tokens - 1)
        weight_gbs = fast["params"] * 2 / step_s / 1e9
        summary["decode_weight_bandwidth_fraction"] = weight_gbs / args.bandwidth_gbs
        print(
            f"decode: {step_s * 1e3:.2f} ms/step, weights read at {weight_gbs:.0f} GB/s = "
            f"{weight_gbs / args.bandwidth_gbs:.1%} of {args.bandwidth_gbs:.0f} GB/s"
        )
    print(json.dumps(summary))
    if failed := [path for path, result in results.items() if "error" in result]:
        sys.exit(f"error: the {' and '.join(failed)} path{'s' if len(failed) > 1 else ''} did not finish (above)")


def path_result(args, path: str) -> dict:
    """One path of the phase table, in a fresh process (its own peak memory, no shared caches) and under a time
    limit of its own (--path_timeout), so that one slow or failing path leaves the other's row: the path's
    result, or {"error": why}, its stderr's tail printed to stderr."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--path", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.path_timeout or None)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in its {args.path_timeout} s (--path_timeout)"}
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {"error": f"failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
