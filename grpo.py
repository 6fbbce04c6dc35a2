"""grpo.py: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) in one file.

Teaches a small chat model grade-school math (GSM8K) with reinforcement learning: for each question sample a
group of G answers, score them with the reward functions below, turn the scores into group-relative advantages,
and push the policy towards the better answers with a clipped objective and a KL penalty to the starting model.

Run it:  python grpo.py (one GPU) | torchrun --nproc_per_node 8 grpo.py (8 GPUs) | python grpo.py --help
    tiny CPU run: python grpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --device cpu --steps 10 \\
                  --prompts_per_step 2 --group_size 4 --max_new_tokens 64 --eval_size 8 --output_dir out-cpu
    tests:        python -m pytest -q test_grpo.py   (offline, CPU, about 5 minutes on 2 cores)

The objective (maximized), for a question q with sampled answers o_1..o_G and old policy pi_old:
    J(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps_high) A_i) - beta KL_it ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),   A_i = (r_i - mean(r)) / std(r)
    KL_it  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1           (the k3 estimator, >= 0)
grpo_loss() below implements it; each term is tagged there with its number, (1) to (5).

Where this departs from the paper (each is a deliberate, common choice):
 1. Outcome rewards only (no process supervision), computed by plain Python functions.
 2. Pure temperature sampling (no top-k/top-p): the ratio's log-probs are those the answers were drawn from.
 3. pi_old is the policy that sampled, its log-probs from the rollout: no extra pass. With mu = 1 and fp32,
    rho = 1 in value (its gradient is the policy gradient). Under bf16 (the default on CUDA) a bf16 copy
    samples while training computes in bf16 autocast with an fp32 LM head: rho = pi_theta / pi_sampler is
    then an importance ratio, which the clip bounds (logged as logp_mismatch).
 4. --loss_type dapo / dr_grpo change only the normalization in (5) (DAPO, arXiv 2503.14476; Dr. GRPO,
    arXiv 2503.20783); --no-scale_rewards drops the std in A (Dr. GRPO).
 5. pi_ref stays the initial model (the paper's iterative variant refreshes it; there is no reward model).
 6. Completions cut off at --max_new_tokens are trained on like the others (logged as truncated_frac).
 7. With --tools, tokens the environment wrote (tool results) are context, not actions: they condition
    later tokens but are in no sum or count of J (completion_mask).
 8. The k3 KL sits inside the loss, as in the paper: over samples from pi_theta its expected gradient is
    that of KL(pi_ref || pi_theta), not KL(pi_theta || pi_ref) (README, the objective).

A first reading stops at the END OF THE ALGORITHM line: all of GRPO, each step in its plainest form, and --plain
trains through exactly that code. Below it, the fast forms that run by default (each tested equal to its plain
form), then the machinery: answer parsing, tools, data, evaluation, setup, checkpoints, torchrun, logging, the CLI.
"""

import argparse
import ast
import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import json
import math
import operator
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file  # safetensors and tqdm come with transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache


# ----------------------------------------------------------------------------- Config
@dataclasses.dataclass
class Config:
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # hub id or local model folder
    dataset: str = "openai/gsm8k"  # hub id, or a local .jsonl/.json/.parquet file or folder of train/test files
    dataset_config: str = "main"  # hub dataset config name
    output_dir: str = "out"  # metrics.jsonl, metrics.png, eval_<step>.jsonl, checkpoint/, final/
    steps: int = 200  # number of rollout -> update steps
    prompts_per_step: int = 16  # questions per step, over all ranks
    group_size: int = 8  # G: completions sampled per question
    max_new_tokens: int = 400  # longest completion; longer ones are cut off and counted
    temperature: float = 1.0  # sampling temperature, also used in the log-probs of the loss
    lr: float = 2e-6  # AdamW learning rate (full fine-tuning; LoRA's is --lora_lr)
    adam_beta1: float = 0.9  # AdamW beta1: decay of the gradient's running mean
    adam_beta2: float = 0.99  # AdamW beta2: decay of the squared gradient's running mean
    warmup_steps: int = 10  # linear learning-rate warmup, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    beta: float = 0.04  # beta: weight of the KL penalty; 0 loads no reference model
    clip_eps: float = 0.2  # epsilon: PPO-style clip range for the ratio
    clip_eps_high: float = -1.0  # epsilon_high: upper clip (DAPO's clip-higher); -1 = clip_eps
    mu: int = 1  # mu: optimizer steps per rollout batch, all with pi_old = the policy that sampled
    loss_type: str = "grpo"  # normalization: grpo (paper), dapo (token mean), dr_grpo (constant)
    scale_rewards: bool = True  # divide advantages by the group's reward std (paper); off = Dr. GRPO
    micro_batch_size: int = 8  # completions per forward/backward (gradient accumulation); -1 = all
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    lora_rank: int = 0  # r: train rank-r adapters on the decoder's linear layers, base frozen; 0 = full fine-tuning
    lora_alpha: float = 32.0  # alpha: the adapters' update is scaled by alpha / r
    lora_lr: float = 6e-5  # AdamW learning rate of the adapters: 30x --lr, as measured (docs/results.md)
    precision: str = "auto"  # bf16 (bf16 compute and sampling over fp32 weights), fp32, or auto (bf16 on CUDA)
    tools: str = ""  # names in TOOLS, comma-separated; "calculator": <calc>EXPR</calc> mid-answer, then <result>
    max_tool_calls: int = 4  # T: tool calls per completion; a call past T is answered with an error
    eval_size: int = 200  # test problems per evaluation (the first N); -1 = all; 0 = no evaluation
    eval_every: int = 50  # evaluate every N steps (and before and after training); 0 = only before/after
    eval_samples: int = 0  # k > 0: also sample k answers per problem and report maj@k and pass@k
    eval_batch_size: int = 64  # problems per evaluation batch
    eval_only: bool = False  # evaluate --model and exit
    save_every: int = 50  # write output_dir/checkpoint every N steps and at the last; 0 = never
    resume: bool = False  # continue from output_dir/checkpoint; with a larger --steps, extend a finished run
    sample_every: int = 10  # print a question with its best and worst completion every N steps; 0 = never
    report_to: str = "none"  # none, wandb or trackio: also log the config and every metrics record there
    seed: int = 0  # seeds data order, sampling and everything else
    device: str = ""  # cpu, cuda, cuda:1, ...; "" = cuda if available
    trust_remote_code: bool = False  # let transformers run code shipped with the model (off: safer)
    plain: bool = False  # train through the first reading's plain forms alone (slow; for learning, tiny runs)


# ----------------------------------------------------------------------------- Rewards (edit me)
SYSTEM_PROMPT = """Think step by step, then answer. Reply in exactly this format:
<reasoning>
your step by step reasoning
</reasoning>
<answer>
the final number only
</answer>"""
# A worked example, shown as an earlier turn of the chat: small models copy a shown format far more readily
# than a described one (SmolLM2-135M-Instruct: 40 of 64 samples used the tags, 1 of 64 with the example inside
# the system prompt). Set to () to drop it.
EXAMPLE = ("What is 2 + 3 * 4?", "<reasoning>\n3 * 4 = 12, and 2 + 12 = 14.\n</reasoning>\n<answer>\n14\n</answer>")


def correctness_reward(completion: str, answer: str, **kwargs) -> float:
    """1 if the <answer> block states the gold number and no other (18 == 18.0 == $18 == \\boxed{18}).

    >>> correctness_reward("<answer>\\n$18.00\\n</answer>", "18")
    1.0
    """
    return float(same_number(stated_number(extract_answer(completion) or ""), stated_number(answer)))


def format_reward(completion: str, answer: str, **kwargs) -> float:
    """1 for exactly '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>' (+ one final newline).

    >>> format_reward("<reasoning>\\n2+2=4\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n", "4")
    1.0
    """
    text = completion[:-1] if completion.endswith("\n") else completion
    if any(completion.count(tag) != 1 for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>")):
        return 0.0
    head, tail = "<reasoning>\n", "\n</answer>"  # each tag once, so a split is unambiguous (and linear)
    body = text[len(head) : -len(tail)] if text.startswith(head) and text.endswith(tail) else ""
    return float("\n</reasoning>\n<answer>\n" in body)


def soft_format_reward(completion: str, answer: str, **kwargs) -> float:
    """1 if a <reasoning> block is followed later by an <answer> block, whatever the spacing.

    >>> soft_format_reward("ok <reasoning>hm</reasoning> <answer>4</answer>", "4")
    1.0
    """
    r0 = completion.find("<reasoning>")
    r1 = completion.find("</reasoning>", r0) if r0 >= 0 else -1
    a0 = completion.find("<answer>", r1) if r1 >= 0 else -1
    return float(a0 >= 0 and completion.find("</answer>", a0) >= 0)


def int_answer_reward(completion: str, answer: str, **kwargs) -> float:
    """1 if the <answer> block states one whole number (right or wrong): GSM8K answers are integers.

    >>> int_answer_reward("<answer>12</answer>", "7"), int_answer_reward("<answer>twelve</answer>", "7")
    (1.0, 0.0)
    """
    value = stated_number(extract_answer(completion) or "")
    return float(value is not None and value == int(value))


def tag_count_reward(completion: str, answer: str, **kwargs) -> float:
    """1/4 for each of the four tags used exactly once, less 1/4 for text after </answer>. Whole quarters: advantages
    divide by the group's spread, so a hair's difference would weigh as much as right against wrong.

    >>> tag_count_reward("<reasoning>\\n</reasoning>\\n<answer>\\n</answer>\\n", "1")
    1.0
    """
    tags = sum(0.25 for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>") if completion.count(tag) == 1)
    end = completion.rfind("</answer>")  # text after it costs a quarter
    trailing = end >= 0 and completion[end + len("</answer>") :].strip() != ""
    return max(0.0, tags - 0.25 * trailing)


# FORK HERE: the rewards (README, Fork it): (function, weight) pairs.
# A completion's reward is their weighted sum (score, below). Each is called as fn(completion, gold answer,
# question=..., tokens=..., max_tokens=...) (tokens: the completion's own token count) and logged as reward/<name>,
# unweighted. Partial credit: a signal before the format.
REWARD_FUNCS = [
    (correctness_reward, 2.0),
    (format_reward, 0.5),
    (soft_format_reward, 0.25),
    (int_answer_reward, 0.25),
    (tag_count_reward, 0.25),
]


# ----------------------------------------------------------------------------- GRPO: advantages, the objective, the step
# Shapes: N prompts, G completions each, B = N*G, P prompt length, L completion length, V vocab.
def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4):
    """A_i = (r_i - b_i) / (std(r_group) + eps), b_i the baseline (marked below): each answer judged against its
    siblings. rewards (B,) with each group's G completions contiguous; a group of equal rewards gives 0."""
    r = rewards.view(-1, group_size)  # (N, G)
    a = r - r.mean(1, keepdim=True)  # FORK HERE: the baseline b_i, the group's mean (README, Fork it: leave-one-out)
    if scale_by_std:
        a = a / (r.std(1, keepdim=True) + eps)  # torch.std is unbiased (divides by G - 1)
    return a.view(-1)  # (B,)


# The loss is -J, with J per token t of completion i (A_i broadcast over the tokens):
#   (1) rho_it  = exp(logp_it - old_logp_it)
#   (2) surr_it = min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i)
#   (3) KL_it   = exp(ref_logp_it - logp_it) - (ref_logp_it - logp_it) - 1
#   (4) J_it    = surr_it - beta KL_it
#   (5) J = grpo:    1/B sum_i (1/|o_i| sum_t J_it)      mean over completions of their token mean (paper)
#           dapo:    sum_i sum_t J_it / sum_i |o_i|      mean over all tokens of the batch
#           dr_grpo: sum_i sum_t J_it / (B max_tokens)   a constant normalizer: no length bias
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04, loss_type="grpo",
              max_tokens=None, clip_eps_high=None):  # fmt: skip
    """The GRPO loss (-J above) and a dict of detached stats. logp/old_logp/ref_logp/mask (B, L),
    advantages (B,); ref_logp may be None when beta == 0; max_tokens defaults to L (dr_grpo); clip_eps_high None
    or negative is clip_eps."""
    eps_high = clip_eps if clip_eps_high is None or clip_eps_high < 0 else clip_eps_high
    A = advantages.unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logp - old_logp)  # (1)  (B, L)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)  # (2)  (B, L)
    surrogate = torch.min(ratio * A, clipped * A)  # (2)  (B, L)
    if beta != 0:  # FORK HERE: the KL estimator (README, Fork it: k2)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # (3)  (B, L)
        per_token = surrogate - beta * kl  # (4)  (B, L)
    else:
        kl, per_token = torch.zeros_like(logp), surrogate  # (4) without the KL term
    masked = per_token * mask  # (B, L)
    if loss_type == "grpo":
        J = (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()  # (5)  scalar
    elif loss_type == "dapo":
        J = masked.sum() / mask.sum().clamp(min=1)  # (5)
    elif loss_type == "dr_grpo":
        J = masked.sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))  # (5)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {LOSS_TYPES}")
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))  # no gradient there
        stats = {"kl": (kl * mask).sum() / tokens, "clip_frac": (is_clipped.float() * mask).sum() / tokens}
    return -J, stats


# A rollout: B = N * G completions, G for each of N prompts (completion b answers prompt b // G).
@dataclasses.dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) each prompt once, left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 for a prompt token, 0 for padding
    completion_ids: torch.Tensor  # (B, L) the sampled tokens; past a completion's length, padding (masked by length)
    lengths: torch.Tensor  # (B,) tokens in each completion, the EOS that ended it included
    ended: torch.Tensor  # (B,) False for a completion cut off at --max_new_tokens
    sample_logp: torch.Tensor  # (B, L) log pi_old of each sampled token: the sampler's own, at the temperature
    by_env: torch.Tensor  # (B, L) True for tokens the environment wrote (tool results); all False without tools
    texts: list[str]  # the B completions as text (special tokens dropped)


def grpo_step(policy, sampler, ref_model, tok, optimizer, rows: list[dict], cfg: Config, world: int = 1):
    """One GRPO step on this rank's `rows`: rollout -> reward -> advantage -> reference log-probs -> update. Returns
    this rank's metric sums {name: [total, count]}, whether each of the mu updates was applied, texts, rewards."""
    model = getattr(policy, "module", policy)  # the model inside DDP
    device, G = next(model.parameters()).device, cfg.group_size
    _, reference_logprobs, update = paths(cfg)  # the plain forms of this reading (--plain), or their fast forms

    # --- 1. rollout: G samples per question from the current policy, pi_old, with their log-probs under it
    ro = generate(sampler, tok, [r["question"] for r in rows], G, cfg.temperature, cfg, device, rows)

    # --- 2. reward: the weighted sum of REWARD_FUNCS for each completion
    group_rows = [r for r in rows for _ in range(G)]
    mask = completion_mask(ro.lengths, ro.completion_ids.shape[1], ro.by_env)  # (B, L) the tokens the model wrote
    funcs = REWARD_FUNCS + (TOOL_REWARD_FUNCS if cfg.tools else [])
    rewards, per_fn = score(ro.texts, group_rows, funcs, mask.sum(1).tolist(), cfg.max_new_tokens, cfg.tools)  # (B,)

    # --- 3. advantage: each completion judged against the others of its group
    advantages = group_advantages(rewards, G, cfg.scale_rewards).to(device)  # (B,)

    # --- 4. reference log-probs (pi_old's came with the rollout: sample_logp)
    model.train()
    ref_logp = reference_logprobs(ref_model, ro, cfg) if ref_model is not None else None  # (B, L)

    # --- 5. update: mu optimizer steps on this batch, each with rho = pi_theta / pi_old
    sums, applied = {}, []
    for i in range(cfg.mu):
        stats, ok = update(policy, optimizer, ro, mask, advantages, ref_logp, cfg, world)
        if i > 0:  # after an update the policy has moved: only the first pass measures the sampler's mismatch
            del stats["logp_mismatch"]
        if ok:
            refresh_sampler(sampler, model)  # the next rollout samples from the updated policy
        applied.append(ok)
        for k, (total, count) in stats.items():
            sums[k] = [sums.get(k, [0.0, 0.0])[0] + total, sums.get(k, [0.0, 0.0])[1] + count]
    sums.update(rollout_metrics(ro, mask, rewards, per_fn, group_rows, tok, cfg))  # what to watch (Logging, below)
    return sums, applied, ro.texts, rewards


def paths(cfg: Config) -> tuple:
    """The one switch between the two ways to train: --plain runs the plain forms of this reading (the sampler, the
    log-probs, the update: slow and memory-hungry, for learning and for trying an idea small); otherwise their fast
    forms below the END line, each a drop-in replacement tested equal to its plain form."""
    if cfg.plain:
        return sample_plainly, plain_reference_logprobs, plain_update
    return rollout, fast_reference_logprobs, fast_update


def completion_mask(lengths: torch.Tensor, L: int, by_env: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) float mask, 1 for the first lengths[b] tokens of row b (its EOS included) that the model
    sampled: tokens the environment wrote (by_env) are context, not actions, so no loss, KL or count."""
    mask = torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]
    return (mask & ~by_env[:, :L]).float() if by_env is not None else mask.float()


def plain_update(policy, optimizer, ro, mask, advantages, ref_logp, cfg: Config, world: int = 1):
    """One optimizer step on the whole batch, plainly: one forward of every sequence (pi_theta's log-probs), -J
    (grpo_loss), backward, clip the gradient and step (clip_and_step: skipped if not finite). mask (B, L): the model's
    own tokens. fast_update computes the same, micro-batched. Returns the stats to log, {name: [total, count]}, and
    whether the update was applied."""
    optimizer.zero_grad(set_to_none=True)
    logp = sequence_logprobs(policy, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, cfg.temperature)  # (B, L) fp32
    # rho = 1 where the model sampled nothing (tools, past the end): no exp(huge) * 0 = NaN in the masked sum
    old_logp = torch.where(mask.bool(), ro.sample_logp, logp.detach())  # (B, L) log pi_old: the sampler's own
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg.clip_eps, cfg.beta, cfg.loss_type,
                            cfg.max_new_tokens, cfg.clip_eps_high)  # fmt: skip
    loss.backward()
    ok, grad_norm = clip_and_step(policy, optimizer, loss.item(), cfg.max_grad_norm, world)
    n = mask.sum().item()  # the token means below are logged as [token sum, tokens]
    mismatch = ((old_logp - logp.detach()).abs() * mask).sum().item()  # summed |log rho| before the step
    return {"loss": [loss.item(), 1.0], "kl": [stats["kl"].item() * n, n], "clip_frac": [stats["clip_frac"].item() * n, n],
            "logp_mismatch": [mismatch, n], "grad_norm": [grad_norm, 1.0]}, ok  # fmt: skip


@torch.no_grad()
def plain_reference_logprobs(ref_model, ro, cfg: Config) -> torch.Tensor:
    """log pi_ref of every completion token (B, L), plainly: sequence_logprobs of the frozen model (with LoRA, the
    policy with its adapters off)."""
    with adapters_off(ref_model):
        return sequence_logprobs(ref_model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, cfg.temperature)


# ----------------------------------------------------------------------------- Sampling and log-probs, plainly
def generate(sampler, tok, questions: list[str], group_size: int, temperature: float, cfg: Config, device,
             rows: list[dict] | None = None) -> Rollout:  # fmt: skip
    """G samples for each question from `sampler` (the policy, or its bf16 copy), each token's log-prob under it:
    sample_plainly under --plain, else rollout (Fast paths: each prompt prefilled once for its G samples, a KV
    cache, no host sync per token). With --tools the tools answer calls inside the rollout, from each question's
    row (rows) what a tool reads there (the lookup: its facts, which the model never sees)."""
    prompt_ids, prompt_mask = tokenize_prompts(tok, [build_prompt(tok, q, cfg.tools) for q in questions], device)
    per_completion = [row for row in rows or [{}] * len(questions) for _ in range(group_size)]  # (B,)
    env = tool_env(tok, cfg.max_tool_calls, cfg.tools, per_completion) if cfg.tools else None
    sampler.eval()  # no dropout, and no activation checkpointing (it would drop the KV cache)
    draw = paths(cfg)[0]  # sample_plainly, or rollout
    ids, lengths, ended, sample_logp, by_env = draw(sampler, prompt_ids, prompt_mask, group_size, cfg.max_new_tokens,
                                                      temperature, eos_ids(sampler, tok), tok.pad_token_id, env=env)  # fmt: skip
    texts = [tok.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids.tolist(), lengths.tolist())]
    return Rollout(prompt_ids, prompt_mask, ids, lengths, ended, sample_logp, by_env, texts)


@torch.no_grad()
def sample_plainly(model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int, temperature: float, eos,
                   pad_id: int, env=None):  # fmt: skip
    """The rollout in its plainest form: each prompt G times, then a token at a time, the whole sequence so far
    through the model, softmax(logits / T), one draw and its log-prob. The draw is argmax(p / q), q ~ Exp(1): q_i / p_i
    is an Exponential(p_i) clock, and the first to ring is i with probability p_i: an exact draw from p, and rollout's
    (same noise, same tokens). With env (tools), environment_turn may write a row's token instead of the model.
    Returns what rollout does: completion ids (B, L), lengths (B,) (EOS included), ended (B,), sample_logp, by_env."""
    ids, mask = prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)  # (B, P)
    (B, P), dev = ids.shape, ids.device
    ended, lengths = torch.zeros(B, dtype=torch.bool, device=dev), torch.full((B,), max_new_tokens, device=dev)
    logps, written = [], []  # per token: (B, 1) log-probs, (B,) written by the environment
    turns = {"ids": [[] for _ in range(B)], "queue": [[] for _ in range(B)], "calls": [0] * B, "eos": set(eos)}
    for t in range(max_new_tokens):
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts each row's positions
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits[:, -1].float()
        logp = torch.log_softmax(logits / (temperature or 1.0), -1)  # (B, V)
        q = torch.empty_like(logp).exponential_() if temperature > 0 else torch.ones_like(logp)  # T = 0: argmax
        token = (logp.exp() / q.clamp(min=torch.finfo(q.dtype).tiny)).argmax(-1)  # (B,)
        logps.append(logp.gather(-1, token[:, None]))
        by_env = torch.zeros(B, dtype=torch.bool, device=dev)
        if env is not None:
            token, by_env = environment_turn(env, token, ended, turns)
        token = torch.where(ended, pad_id, token)  # past its end a row holds padding
        new_end = ~ended & ~by_env & torch.isin(token, torch.tensor(eos, device=dev))  # only the model ends a row
        lengths, ended = torch.where(new_end, t + 1, lengths), ended | new_end
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        written.append(by_env)
        if ended.all():
            break
    L = int(lengths.max())
    return ids[:, P : P + L], lengths, ended, torch.cat(logps, 1)[:, :L], torch.stack(written, 1)[:, :L]


def sequence_logprobs(model, prompt_ids, prompt_mask, completion_ids, temperature: float) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, plainly: each completion after its prompt, one forward
    of the whole sequences, logits -> log_softmax -> gather. (B, L), fp32. token_logprobs (Fast paths) computes
    the same, and is what the default mode runs: each prompt once, and never the (B, L, V) tensor this one holds."""
    G = completion_ids.shape[0] // prompt_ids.shape[0]
    ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion_ids], 1)  # (B, P + L)
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), torch.ones_like(completion_ids)], 1)  # (B, P + L)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    L = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits[:, -L - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, -1)  # position P-1+t predicts completion token t
    return logp.gather(-1, completion_ids[..., None])[..., 0]  # (B, L)


# ----------------------------------------------------------------------------- Training loop
def main(cfg: Config, on_step=None, given: set[str] | None = None) -> None:
    """Train (or evaluate). on_step(step, model, metrics, sums), for tests, runs on every rank after every step.
    given: the flags on the command line, which alone change a resumed run's config (None: all non-defaults)."""
    cfg, state = read_checkpoint(cfg, given)  # --resume: the checkpoint's configuration and trainer state
    check_config(cfg)  # before any loading: a bad value or a missing optional package costs one line
    train_rows, test_rows = load_data(cfg)  # the user's data first: wrong columns or answers stop here
    rank, world, device = setup_distributed(cfg)
    if cfg.prompts_per_step % world:
        fail(f"--prompts_per_step {cfg.prompts_per_step} does not divide over {world} processes: use a multiple of {world}")  # fmt: skip
    os.makedirs(cfg.output_dir, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)
    bf16 = use_bf16(cfg, device)
    log(f"device {device} | dtype {describe_precision(cfg, device)} | ranks {world}")

    resume_from = check_output_dir(cfg)
    weights = cfg.model if cfg.lora_rank or not resume_from else resume_from  # LoRA saves adapters: --model, then them
    warn_if_slow_on_cpu(cfg, weights, device, rank)  # a GPU-sized job on a CPU: one line, at once
    model, tok = load_model(weights, cfg, device)
    sampler = bf16_copy(model) if bf16 and not cfg.lora_rank else model  # bf16 weights and cache; LoRA: the policy
    tracker = start_tracker(cfg, rank)  # --report_to: rank 0's run of wandb or trackio, None otherwise
    if cfg.eval_only:
        return evaluate_only(sampler, tok, test_rows, cfg, device, rank, world, tracker, log)

    policy, ref_model, optimizer, scheduler = setup_training(model, cfg, resume_from, world, device, bf16)
    start_step, skipped = resume_state(state, optimizer, scheduler, cfg, rank)
    if resume_from:
        log(f"resumed from {resume_from} at step {start_step} of {cfg.steps}")
    elif test_rows:
        metrics = evaluate(sampler, tok, test_rows, cfg, 0, device, rank, world)
        log("eval step 0 | " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if rank == 0:
            write_metrics(cfg, {"step": 0, **metrics}, tracker)

    n_local, bad_in_a_row = cfg.prompts_per_step // world, 0  # prompts per rank
    bar = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps, disable=rank != 0,
               desc="grpo", dynamic_ncols=True)  # fmt: skip
    for step in bar:
        t0 = time.time()
        seed_everything(cfg.seed, rank, step)  # a resumed run needs no saved random state; ranks sample apart
        first = (step - 1) * cfg.prompts_per_step + rank * n_local  # this rank's share of the step's prompts
        rows = [train_rows[i] for i in prompt_indices(len(train_rows), first, n_local, cfg.seed)]
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's updates use (logged before the schedule moves)
        try:
            sums, applied, texts, rewards = grpo_step(policy, sampler, ref_model, tok, optimizer, rows, cfg, world)
        except torch.OutOfMemoryError:
            fail(f"out of GPU memory at step {step}: lower --micro_batch_size (now {cfg.micro_batch_size}), add "
                 f"--gradient_checkpointing or lower --max_new_tokens; the checkpoint in {cfg.output_dir} is intact")  # fmt: skip
        if any(applied):  # the schedule counts applied updates: warmup starts at the first real one
            scheduler.step()
        skipped += applied.count(False)
        bad_in_a_row = check_skipped(applied, bad_in_a_row, skipped, step, cfg, log)
        sums["skipped_updates"] = [float(skipped), 1.0]
        metrics = reduce_metrics(sums, world, device)  # count-weighted means over all ranks
        step_time = time.time() - t0
        tokens_per_s = metrics["completion_len"] * len(texts) * world / step_time  # completion tokens, all ranks
        metrics.update(step=step, lr=lr, step_time=step_time, tokens_per_s=tokens_per_s)
        if test_rows and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            metrics.update(evaluate(sampler, tok, test_rows, cfg, step, device, rank, world))
        if rank == 0:
            log_step(bar, metrics, cfg, bf16, rows[0]["question"], texts, rewards, tracker)
        if on_step is not None:
            on_step(step, model, metrics, sums)
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):  # the last step too: runs get extended
            save_checkpoint(cfg, model, tok, optimizer, scheduler, step, skipped, rank)
    bar.close()
    finish_run(cfg, model, tok, rank, world, tracker, log)  # final/ (from_pretrained loads it), the plot


def setup_training(model, cfg: Config, resume_from: str | None, world: int, device, bf16: bool):
    """pi_ref, the frozen initial policy (None when beta is 0; bf16 weights under bf16), the policy as trained
    (under torchrun wrapped in DDP, which averages the ranks' gradients), AdamW and its warmup schedule."""
    ref_model = None
    if cfg.lora_rank:  # LoRA (below): the base frozen, adapters trained, pi_ref = the policy with its adapters off
        ref_model = add_lora(model, cfg, resume_from)
    elif cfg.beta != 0:  # the frozen reference pi_ref is the initial policy, also after a resume
        initial = load_model(cfg.model, cfg, device)[0] if resume_from else model
        ref_model = bf16_copy(initial) if bf16 else copy.deepcopy(initial).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    policy = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    # fused: one kernel on CUDA; on a CPU too, so that the tests run the implementation a GPU runs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lora_lr if cfg.lora_rank else cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=True)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    return policy, ref_model, optimizer, scheduler


# ============================================================================= END OF THE ALGORITHM
# Everything above is GRPO; --plain trains through it alone. Below: the fast forms that run by default, each tested
# equal to its plain form, then the machinery a first reading skips. What the reading above calls from down here:
#   rollout, fast_reference_logprobs, fast_update  the fast forms of sample_plainly, plain_reference_logprobs, plain_update
#   score               each completion's reward: the weighted sum of the functions, and each one's values
#   TOOL_REWARD_FUNCS   --tools: the tool rewards, a ladder of partial credit for grounded calls (TOOLS), weighted
#   extract_answer      the text of the last <answer>...</answer> block (None if there is none)
#   stated_number       the one number a text states, however wrapped (None for none or several); same_number: equal
#   build_prompt        the chat prompt of a question: SYSTEM_PROMPT, the EXAMPLE turn, the question
#   tokenize_prompts    the prompts as left-padded ids and attention mask (N, P)
#   eos_ids             every token id that ends a completion
#   tool_env            --tools: the environment that answers a completed call (TOOLS) with its result's ids
#   environment_turn    at one decode step, each row's token: the model's draw, or the environment's next one
#   refresh_sampler     after a step, the updated weights into the bf16 sampler (nothing to do without one)
#   rollout_metrics     the step's numbers to watch: accuracy, completion length, cut-off and zero-std shares, tools
#   use_bf16            bf16 compute over the fp32 weights, when --precision (auto: CUDA, not --plain) says so
#   adapters_off        with LoRA, within it the policy computes as pi_ref; add_lora gives it the adapters
#   main's bookkeeping, each named for what it does: check_config, load_data, load_model, warn_if_slow_on_cpu (a bad
#     flag or file stops in one line: fail); describe_precision, bf16_copy (the sampler's weights); read_checkpoint,
#     check_output_dir, resume_state, save_checkpoint (--resume); setup_distributed, reduce_metrics (torchrun);
#     evaluate, evaluate_only (greedy pass@1); seed_everything, prompt_indices (the step's seed and questions);
#     clip_and_step, check_skipped (a non-finite update is skipped, and counted); start_tracker, log_step,
#     write_metrics, finish_run (the logs, final/).


# ----------------------------------------------------------------------------- Fast paths: what training runs, each tested equal to its plain form above
@torch.no_grad()
def frozen_logprobs(model, prompt_ids, prompt_mask, completion_ids, lengths, micro_batch_size: int, temperature: float,
                    bf16: bool = False) -> torch.Tensor:  # fmt: skip
    """token_logprobs (B, L) of a model that is not being trained (pi_ref), each micro-batch trimmed to its own
    longest completion, as accumulate_gradients trims them (past a completion's length: 0, masked by length)."""
    logp, G = torch.zeros(completion_ids.shape, device=completion_ids.device), len(completion_ids) // len(prompt_ids)
    with autocast(prompt_ids.device, bf16), adapters_off(model):  # with LoRA, pi_ref is the policy, adapters off
        for s, p, i, Lm in micro_batches(lengths, micro_batch_size, G):  # logp (B, L); i: each row's prompt in p
            logp[s, :Lm] = token_logprobs(model, prompt_ids[p], prompt_mask[p], completion_ids[s, :Lm], i, temperature)
    return logp


def micro_batches(lengths: torch.Tensor, size: int, group_size: int) -> list[tuple[slice, slice, torch.Tensor, int]]:
    """Rows [i, i + size) of the batch (size < 1: all), the prompt rows they use, each row's index into those, and
    their longest completion: all read from the host at once, before the loop (nothing in it waits for the GPU)."""
    B, dev = lengths.shape[0], lengths.device
    rows = [slice(i, min(i + size, B)) for i in range(0, B, size if size > 0 else B)]
    longest = torch.stack([lengths[s].max() for s in rows]).tolist()
    prompts = [slice(s.start // group_size, (s.stop - 1) // group_size + 1) for s in rows]
    index = [torch.arange(s.start, s.stop, device=dev) // group_size - p.start for s, p in zip(rows, prompts)]
    return list(zip(rows, prompts, index, longest))


def accumulate_gradients(policy, prompt_ids, prompt_mask, completion_ids, lengths, mask, advantages, old_logp,
                         ref_logp, cfg: Config, micro_batch_size: int, world: int = 1) -> dict[str, list[float]]:  # fmt: skip
    """Backward of the loss over the batch (B rows), micro_batch_size rows at a time. old_logp (B, L): log pi_old
    (the rollout's sample_logp); mask (B, L): the model's own tokens (completion_mask), in every sum. Each
    micro-batch's loss is weighted by its share of the batch's normalizer (5): the accumulated gradient is the
    full batch's exactly (DDP averages over ranks, so dapo's share is of the global tokens times the world).
    Returns {"loss": [value, 1], "kl"/"clip_frac"/"logp_mismatch" (|old_logp - logp|): [token sum, tokens]}."""
    B, total_tokens = completion_ids.shape[0], mask.sum()
    if world > 1 and cfg.loss_type == "dapo":
        dist.all_reduce(total_tokens)  # dapo normalizes by the tokens of the whole global batch
    slices = micro_batches(lengths, micro_batch_size, B // prompt_ids.shape[0])
    sums = torch.zeros(5, dtype=torch.float64, device=prompt_ids.device)  # loss, kl, clip_frac, |log rho|, tokens
    bf16 = use_bf16(cfg, prompt_ids.device)
    for j, (s, p, index, Lm) in enumerate(slices):
        m = mask[s, :Lm]  # (mb, Lm): the micro-batch trimmed to its longest completion
        wait = world > 1 and j < len(slices) - 1  # DDP averages over ranks once, in the last micro-batch's backward
        with policy.no_sync() if wait else contextlib.nullcontext(), autocast(prompt_ids.device, bf16):
            logp = token_logprobs(policy, prompt_ids[p], prompt_mask[p], completion_ids[s, :Lm], index, cfg.temperature)
            # rho = 1 where the model sampled nothing (tools, past the end): no exp(huge) * 0 = NaN in the masked sum
            old = torch.where(m.bool(), old_logp[s, :Lm], logp.detach())
            ref = None if ref_logp is None else ref_logp[s, :Lm]
            loss, stats = grpo_loss(logp, old, ref, advantages[s], m, cfg.clip_eps, cfg.beta, cfg.loss_type,
                                    cfg.max_new_tokens, cfg.clip_eps_high)  # fmt: skip
            share = mask[s].sum() * world / total_tokens if cfg.loss_type == "dapo" else (s.stop - s.start) / B
            (loss * share).backward()
        tokens = m.sum()  # the metric sums stay on the device: one read after the loop, not one per micro-batch
        mismatch = ((old - logp.detach()).abs() * m).sum()  # summed |log rho|
        sums += torch.stack([loss.detach() * share, stats["kl"] * tokens, stats["clip_frac"] * tokens, mismatch, tokens])  # fmt: skip
    loss, kl, clip, mismatch, n = sums.tolist()
    return {"loss": [loss, 1.0], "kl": [kl, n], "clip_frac": [clip, n], "logp_mismatch": [mismatch, n]}


def fast_update(policy, optimizer, ro, mask, advantages, ref_logp, cfg: Config, world: int = 1):
    """plain_update's fast form: the gradient accumulated a micro-batch at a time (accumulate_gradients), then the
    step unless it is not finite on some rank (clip_and_step). The same return."""
    optimizer.zero_grad(set_to_none=world == 1)  # torchrun: zeroed in place, DDP's buckets (clip_and_step)
    stats = accumulate_gradients(policy, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.lengths, mask,
                                 advantages, ro.sample_logp, ref_logp, cfg, cfg.micro_batch_size, world)  # fmt: skip
    ok, grad_norm = clip_and_step(policy, optimizer, stats["loss"][0], cfg.max_grad_norm, world)
    return {**stats, "grad_norm": [grad_norm, 1.0]}, ok


def fast_reference_logprobs(ref_model, ro, cfg: Config) -> torch.Tensor:
    """plain_reference_logprobs' fast form: frozen_logprobs, a micro-batch at a time."""
    return frozen_logprobs(ref_model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.lengths,
                           cfg.micro_batch_size, cfg.temperature, use_bf16(cfg, ro.prompt_ids.device))  # fmt: skip


@torch.no_grad()
def rollout(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, eos, pad_id, ignore_eos=False,
            env=None):  # fmt: skip
    """sample_plainly's fast form: the same draws and returns (completion ids (B, L), row b answering prompt b // G;
    lengths, ended, sample_logp, by_env), tokens past a completion's end pad_id, masked by length, not by value.
    Each prompt (N, P, left-padded) is prefilled once and its KV cache shared by its G samples, not run G times.
    The model computes in its own dtype (run it outside autocast): a bf16 model keeps a bf16 cache."""
    with sampling_adapters(model):  # LoRA: the adapters cast once for this rollout (nothing without LoRA)
        n, P = prompt_ids.shape
        B, dev = n * group_size, prompt_ids.device
        row_prompt = torch.arange(B, device=dev) // group_size  # (B,) the prompt of each row
        # --- prefill: each prompt once; its KV cache is then repeated for its G rows
        position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (n, P): left padding shifts positions
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt_ids, attention_mask=attention_mask_4d(causal_keep(prompt_mask, P), model),
                    position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        check_cache_filled(cache, P)
        logits = out.logits[:, -1].float()[row_prompt]  # (B, V)
        cache.batch_select_indices(row_prompt)  # (n, ...) -> (B, ...)
        keep = torch.cat([prompt_mask.bool()[row_prompt], prompt_mask.new_ones(B, max_new_tokens, dtype=torch.bool)], 1)
        # one mask (B, 1, 1, P + max_new_tokens) for the decode, a slice per step: additive (0 or -inf) in the model's
        # dtype, as SDPA would convert a boolean one in every layer, 3 ops each (--decode_ops)
        dtype = model.get_input_embeddings().weight.dtype
        bias = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill_(~keep, float("-inf"))[:, None, None]
        next_position = position[row_prompt, -1:] + 1  # (B, 1): token t's position is next_position + t
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        sample_logp, by_env = torch.zeros(B, max_new_tokens, device=dev), torch.zeros_like(tokens, dtype=torch.bool)
        lengths, ended = torch.full((B,), max_new_tokens, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
        turns = {"ids": [[] for _ in range(B)], "queue": [[] for _ in range(B)], "calls": [0] * B, "eos": set(eos)}
        eos = torch.tensor(eos, device=dev)
        # --- decode, a token per row per step: only the check below waits for the GPU, so the CPU queues kernels ahead
        for t in range(max_new_tokens):
            token, sample_logp[:, t] = sample(logits, temperature)
            if env is not None:  # tools: the environment may write this step's token instead of the model
                token, by_env[:, t] = environment_turn(env, token, ended, turns)
            tokens[:, t] = torch.where(ended, pad_id, token)
            if not ignore_eos:
                new_end = ~ended & ~by_env[:, t] & torch.isin(token, eos)  # only the model ends its completion
                lengths, ended = torch.where(new_end, t + 1, lengths), ended | new_end  # the EOS counts in the length
            if (not ignore_eos and t % 8 == 7 and bool(ended.all())) or t == max_new_tokens - 1:  # the one host sync
                break
            # token t sits at slot P + t and may see the prompt (less its padding) and the tokens so far
            logits = model(input_ids=tokens[:, t : t + 1], attention_mask=bias[..., : P + t + 1],
                           position_ids=next_position + t, cache=cache, use_cache=True).logits[:, -1].float()  # fmt: skip
        L = max_new_tokens if ignore_eos else int(lengths.max())
        return tokens[:, :L], lengths, ended, sample_logp[:, :L], by_env[:, :L]


def check_cache_filled(cache, P: int) -> None:
    """A model's forward ignores keywords it does not know: if transformers renames `cache` again, the
    cache stays empty and every decode step would see only itself. Stop instead of training on that."""
    if cache.get_seq_length() != P:
        fail(f"the model did not fill its KV cache ({cache.get_seq_length()} of {P} positions): this transformers "
             f"version passes the cache under another name; install the version in requirements.txt")  # fmt: skip


def sample(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / T) (argmax when T = 0), and its log-prob: (R,), (R,). argmax(p / q)
    with q ~ Exponential(1) is an exact draw from p (the smallest of independent Exponential(p_i) clocks rings first,
    at index i with probability p_i), and unlike torch.multinomial it never waits for the GPU."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), -1)  # (R, V)
    if temperature > 0:
        q = torch.empty_like(logp).exponential_().clamp_(min=torch.finfo(logp.dtype).tiny)  # no 0/0
        token = (logp.exp() / q).argmax(-1)
    else:
        token = logits.argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(1)


def attention_mask_4d(keep: torch.Tensor, model) -> torch.Tensor:
    """keep (R, K) for one query or (R, Q, K), bool, True where a query may attend -> the 4-D mask (R, 1, Q, K)
    that transformers passes to the attention kernels as is. Given a 2-D mask instead, it builds the 4-D one
    itself and asks the GPU whether there is any padding: a host sync per forward (per token when decoding)."""
    keep = keep[:, None] if keep.dim() == 2 else keep  # (R, Q, K)
    if model.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
        return torch.zeros(keep.shape, dtype=model.dtype, device=keep.device).masked_fill(~keep, -1e9)[:, None]
    return keep[:, None]  # sdpa and flex: True = attend


def causal_keep(key_mask: torch.Tensor, Q: int) -> torch.Tensor:
    """key_mask (R, K), 1 for a real token and 0 for padding -> keep (R, Q, K) for the last Q of the K positions:
    each sees the real tokens up to itself, and always itself, so that a padding position sees something (a
    row with nothing to attend to is a softmax of -inf, NaN in some kernels)."""
    K = key_mask.shape[1]
    query = torch.arange(K - Q, K, device=key_mask.device)[:, None]  # (Q, 1): the queries' positions
    key = torch.arange(K, device=key_mask.device)[None, :]  # (1, K)
    return (key_mask.bool()[:, None, :] & (key <= query)) | (key == query)


def eos_ids(model, tok) -> list[int]:
    """Every token id that ends a completion (chat models often have several)."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tok.eos_token_id]) - {None})


def bf16_copy(model):
    """A frozen copy whose parameters are bf16 (half the memory, and bf16 compute with no autocast)."""
    return bf16_weights(copy.deepcopy(model).requires_grad_(False).eval())


def bf16_weights(model):
    """The parameters to bf16, in place; returns the model. Buffers such as the rotary inv_freq stay fp32: in bf16
    they would be off by up to ~0.5 rad at position 600 for rope theta 1e6."""
    for p in model.parameters():  # tied weights are one Parameter: converted once, still tied
        p.data = p.data.to(torch.bfloat16)
    return model


def refresh_sampler(sampler, model) -> None:
    """After an optimizer step: copy the fp32 weights into the bf16 sampler, one fused foreach copy."""
    if sampler is not model:
        with torch.no_grad():
            torch._foreach_copy_(list(sampler.parameters()), list(model.parameters()))


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, prompt_index, temperature: float,
                   chunk: int = 1024) -> torch.Tensor:  # fmt: skip
    """log pi(o_t | q, o_<t) for every completion token: (B, L), fp32. prompt_ids, prompt_mask (N, P): the distinct
    prompts; completion_ids (B, L); prompt_index (B,): each completion's prompt row. As in the rollout, each prompt
    runs through the model once and its KV cache is shared by its G completions (gradients flow through it). The
    model returns hidden states, not logits; head_logprobs projects them with the fp32 LM head a chunk at a time,
    so no (B, L, V) tensor exists."""
    (B, L), P = completion_ids.shape, prompt_ids.shape[1]
    inner = getattr(model, "module", model)  # the model inside DDP: only the last forward goes through DDP
    position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, P)
    mask = torch.cat([prompt_mask[prompt_index], prompt_mask.new_ones(B, L)], 1)  # (B, P + L); past-the-end: loss mask
    if inner.is_activation_checkpointing and inner.training:  # checkpointed layers drop the KV cache: no sharing
        ids = torch.cat([prompt_ids[prompt_index], completion_ids], 1)  # (B, P + L)
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = final_hidden(model, inner, input_ids=ids, attention_mask=attention_mask_4d(causal_keep(mask, P + L), inner),
                              position_ids=position, use_cache=False)  # fmt: skip
        return head_logprobs(inner, hidden[:, -L - 1 : -1], completion_ids, temperature, chunk)  # P-1+t predicts t
    cache = DynamicCache(config=inner.config)
    first = final_hidden(inner, inner, input_ids=prompt_ids, attention_mask=attention_mask_4d(causal_keep(prompt_mask, P), inner),
                         position_ids=position, cache=cache, use_cache=True)[:, -1:]  # fmt: skip  # (N, 1, H): predicts token 0
    check_cache_filled(cache, P)
    cache.batch_select_indices(prompt_index)  # (N, ..) -> (B, ..), differentiable
    completion_position = position[prompt_index, -1:] + 1 + torch.arange(L, device=position.device)  # (B, L)
    rest = final_hidden(model, inner, input_ids=completion_ids, attention_mask=attention_mask_4d(causal_keep(mask, L), inner),
                        position_ids=completion_position, cache=cache, use_cache=True)[:, :-1]  # fmt: skip  # (B, L - 1, H)
    hidden = torch.cat([first[prompt_index], rest], 1)  # (B, L, H): hidden[:, t] predicts completion token t
    return head_logprobs(inner, hidden, completion_ids, temperature, chunk)


def final_hidden(model, inner, **inputs) -> torch.Tensor:
    """The last hidden states (.., T, H) of a forward of `model` (through DDP when wrapped, so that
    gradients are averaged), read by a hook on the base model; the head is asked for no position."""
    seen = []
    hook = inner.base_model.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        hook.remove()
    return seen[0]


def head_logprobs(inner, hidden: torch.Tensor, ids: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """log softmax(h W^T / T)[id] for hidden (B, L, H) and ids (B, L): (B, L) fp32, with the fp32 LM head weight W and
    autocast off (a bf16 head rounds logits near 20 to steps of 0.125, up to 0.06 nats in every log-prob). `chunk`
    tokens at a time, each recomputed in backward instead of stored: the largest tensor is (chunk, V), whatever B."""
    head = inner.get_output_embeddings()  # tied to the input embeddings in many models: the same Parameter
    weight = head.weight.float()  # (V, H): the master weight itself when fp32; one copy for a bf16 model
    bias = head.bias.float() if head.bias is not None else None

    def chunk_logprobs(h, i):  # h (n, H), ids (n,) -> (n,)
        with torch.autocast(h.device.type, enabled=False):
            logits = torch.nn.functional.linear(h.float(), weight, bias) / temperature  # (n, V) fp32
            return logits.gather(-1, i[:, None]).squeeze(-1) - logits.logsumexp(-1)

    # checkpointed (no randomness to replay); split, not sliced per chunk: backward concatenates the gradients once
    parts = [torch.utils.checkpoint.checkpoint(chunk_logprobs, h, i, use_reentrant=False, preserve_rng_state=False)
             for h, i in zip(hidden.flatten(0, 1).split(chunk), ids.flatten().split(chunk))]  # fmt: skip
    return torch.cat(parts).view(ids.shape)


# ----------------------------------------------------------------------------- Rewards, machinery: scoring, and the number an answer states
def score(completions: list[str], rows: list[dict], funcs: list, tokens: list[int], max_tokens: int,
          tools: str = "") -> tuple[torch.Tensor, dict[str, list[float]]]:  # fmt: skip
    """Total rewards (B,) and each function's unweighted values; rows[i] is completion i's row; funcs: (function,
    weight) pairs. Every function is called as fn(completion, gold answer, **keywords), always with every keyword:
    the row's other fields (question, facts, ...), tokens (the completion's own token count), max_tokens
    (--max_new_tokens), e.g. for a length penalty, and tools (--tools: only the offered tools' calls can pay)."""
    per_fn, total = {fn.__name__: [] for fn, _ in funcs}, []
    for i, (c, row) in enumerate(zip(completions, rows)):
        extra = {k: v for k, v in row.items() if k not in ("answer", "gold")}  # e.g. question
        extra.update(tokens=tokens[i], max_tokens=max_tokens, tools=tools)
        r = 0.0
        for fn, weight in funcs:
            value = float(fn(c, row["gold"], **extra))
            per_fn[fn.__name__].append(value)
            r += weight * value
        total.append(r)
    return torch.tensor(total, dtype=torch.float32), per_fn


# One number as people write it: a sign (-, + or the unicode minus; not after a letter or digit, so
# 5-18 is two numbers), digits with optional thousands commas (1,234 but not 12,34), a decimal part.
# The leading lookahead skips positions where no number can start (fast on long text).
NUMBER = re.compile(r"(?=[-+\u2212\d.])(?:(?<![\w.])[-+\u2212])?(?:(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|\.\d+)")


def number_value(token: str) -> float | None:
    """The value of one NUMBER token; None if it is too large to be finite (400 nines)."""
    value = float(token.replace(",", "").replace("\u2212", "-"))
    return value if math.isfinite(value) else None


def stated_number(text: str) -> float | None:
    """The one number `text` states, however it is wrapped (\\boxed{18}, **18**, $18$, 18%, 18 apples, x = 18, +18,
    −18 with the unicode minus); None when it states no number or several ('18 or 19', '2 + 16 = 18'). The rule for
    every answer check: rewards, lenient accuracy and the maj@k vote.

    >>> stated_number("\\boxed{1,234}"), stated_number("**−18** apples"), stated_number("18 or 19")
    (1234.0, -18.0, None)
    """
    found = NUMBER.findall(text)  # one linear scan; the wrapping around the number is ignored
    return number_value(found[0]) if len(found) == 1 else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6)


def extract_answer(completion: str) -> str | None:
    """The content of the last complete <answer>...</answer> block, stripped; None if there is none.

    >>> extract_answer("<answer>1</answer> <answer> 42 </answer>")
    '42'
    """
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    return completion[start + len("<answer>") : end].strip() if start >= 0 else None


# ----------------------------------------------------------------------------- Guards: a non-finite update is skipped, three in a row stop the run
def clip_and_step(model, optimizer, loss: float, max_grad_norm: float, world: int) -> tuple[bool, float]:
    """Clip the accumulated gradient and take the optimizer step, unless the loss or the gradient is
    not finite on some rank: that update would corrupt the weights, so every rank skips it alike.
    Returns (whether the update was applied, the gradient norm before clipping)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    finite = torch.tensor(float(math.isfinite(loss) and bool(torch.isfinite(grad_norm))), device=grad_norm.device)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank takes the same decision
    if finite.item() == 1.0:
        optimizer.step()
    else:  # under DDP (gradient_as_bucket_view) the gradients are views of its buckets, which always exist: zeroed
        optimizer.zero_grad(set_to_none=world == 1)  # in place, the next micro-batches add into them; set to None,
    return finite.item() == 1.0, grad_norm.item()  # they would be fresh tensors, a second copy, until the last one


def check_skipped(applied: list[bool], bad_in_a_row: int, skipped: int, step: int, cfg: Config, log) -> int:
    """Say when a step's update was skipped as non-finite; three skipped in a row stop the run (the
    weights were never touched, and the last checkpoint is intact). Returns the count in a row."""
    for ok in applied:
        bad_in_a_row = 0 if ok else bad_in_a_row + 1
    if not all(applied):
        log(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
    if bad_in_a_row >= 3:
        fail(f"{bad_in_a_row} non-finite updates in a row at step {step}: lower --lr or check the rewards; "
             f"the last checkpoint in {cfg.output_dir} is intact (--resume)")  # fmt: skip
    return bad_in_a_row


# ----------------------------------------------------------------------------- Tools (off by default): the registry, the calculator, the environment, the rewards
# A tool is a plain function, text in, text out ('error: ...', never an exception), and an entry of TOOLS (below):
# the model writes <TAG>INPUT</TAG> mid-answer, the environment appends <result>OUTPUT</result>.
TOOL_RESULT = ("<result>", "</result>")
CALC_MAX_CHARS = 200  # checked before parsing, so parse time and the number of AST nodes are bounded
CALC_MAX_DEPTH = 100  # nesting of the tree, bounds the recursion (1+1+...+1 in 200 characters fits)
CALC_MAX_ABS = 10**30  # every intermediate value; keeps each operation on small numbers
CALC_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
CALC_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
PLAIN_NUMBER = re.compile(r"\d+(\.\d*)?|\.\d+")  # what a written number may look like: the value it has
CALC_SIGNS = str.maketrans({"\N{MULTIPLICATION SIGN}": "*", "\N{DIVISION SIGN}": "/", "\N{MINUS SIGN}": "-"})


def calculator(expression: str) -> str:
    """Evaluate arithmetic: numbers, + - * / // % **, parentheses (unicode multiplication, division, minus signs read
    as * / -). Anything else, or too big, is 'error: ...', never an exception. Integers are exact, others rounded to
    6 decimals, zeros stripped. ^ is an error with a hint, not a power: one spelling to learn, and Python's ^ is XOR.

    >>> calculator("347 * 86"), calculator("(1 + 2) / 4"), calculator("6 / 3"), calculator("2 ^ 3")
    ('29842', '0.75', '2', 'error: ^ is not an operator here, use ** for powers')
    """
    if len(expression) > CALC_MAX_CHARS:
        return f"error: longer than {CALC_MAX_CHARS} characters"
    if "^" in expression:
        return "error: ^ is not an operator here, use ** for powers"
    text = " ".join(expression.translate(CALC_SIGNS).split())  # one line, no indent

    def walk(node: ast.AST, depth: int) -> int | float:
        if depth > CALC_MAX_DEPTH:
            raise ValueError("too deeply nested")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, str, complex
            if not PLAIN_NUMBER.fullmatch(ast.get_source_segment(text, node) or ""):  # 1_200, 12e2, 0x4B0
                raise ValueError("write numbers as plain decimals, like 1200 or 0.5")
            x = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in CALC_UNARY:
            x = CALC_UNARY[type(node.op)](walk(node.operand, depth + 1))
        elif isinstance(node, ast.BinOp) and type(node.op) in CALC_BINARY:
            a, b = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Pow) and abs(a) not in (0, 1) and b * math.log10(abs(a)) > 31:
                raise ValueError("result too large")  # estimated before computing: 9**9**9 never starts
            exact = isinstance(node.op, ast.Div) and type(a) is type(b) is int and b and a % b == 0
            x = a // b if exact else CALC_BINARY[type(node.op)](a, b)  # exact, where a float would round 10**30 / 10
        else:
            raise ValueError(f"{type(getattr(node, 'op', node)).__name__} is not allowed")
        if type(x) not in (int, float) or not abs(x) <= CALC_MAX_ABS:  # complex from (-8)**0.5; inf; nan
            raise ValueError("result too large" if type(x) in (int, float) else "not a real number")
        return x

    try:
        tree = ast.parse(text, mode="eval")  # a syntax tree only: nothing is compiled to code or run
    except Exception:  # SyntaxError; ValueError for null bytes; RecursionError if the length cap is raised
        return "error: invalid syntax"
    try:
        x = walk(tree.body, 0)
    except ZeroDivisionError:
        return "error: division by zero"
    except ValueError as e:  # raised by walk, with a short message
        return f"error: {e}"
    except Exception as e:  # OverflowError, MemoryError, RecursionError: not expected, but never raise
        return f"error: {type(e).__name__}"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 1e9:  # 6 decimals would print float noise: 15 significant digits, 1e+20 past 1e15
        return f"{x:.15g}"
    return f"{round(x, 6) or 0.0:.6f}".rstrip("0").rstrip(".")  # 'or 0.0': -0.0000001 prints as 0


def has_operator(expression: str) -> bool:
    """A calculator call computes when it has an operator, not just a (signed) number: for the first rung."""
    tree = ast.parse(" ".join(expression.translate(CALC_SIGNS).split()), mode="eval")  # the calculator took it
    return any(isinstance(node, ast.BinOp) for node in ast.walk(tree))


def grounded_arithmetic(expression: str, result: str, known: list[str]) -> int:
    """The calculator's grounded work: 2 for arithmetic that combines two different numbers into a new one, each in the
    question or an earlier grounded result (known); 1 for one such number with itself (347 - 347: it may be built on
    and answered, but earns no upper rung); 0 for a copy (1200 * 1) or an invented number."""
    numbers = [abs(v) for v in map(number_value, NUMBER.findall(known[0])) if v is not None]  # the question's
    numbers += [abs(v) for v in map(result_number, known[1:]) if v is not None]  # results, whole: not 1e+24's 24
    written = [abs(v) for v in map(number_value, NUMBER.findall(expression)) if v is not None]  # a sign is arithmetic
    value = result_number(result)
    copied = value is None or any(same_number(abs(value), w) for w in written)  # 1200 * 1 computes nothing new
    grounded = all(any(same_number(w, k) for k in numbers) for w in written)
    return min(2, len(set(written))) if grounded and not copied else 0


def grounded_input(text: str, result: str, known: list[str]) -> int:
    """The grounded work of a tool that names no rule, as a lookup: 2 (every rung) for a call whose input is in the
    question or an earlier grounded result as a whole phrase, any case (a key read there, not invented: 'locker 1'
    is not in 'locker 17'), else 0."""
    phrase = re.compile(rf"(?<!\w){re.escape(' '.join(text.split()))}(?!\w)", re.I)
    return 2 if text.strip() and any(phrase.search(" ".join(k.split())) for k in known) else 0


def lookup(key: str, facts) -> str:
    """The value the question's facts ([key, value] pairs, its row's facts column) hold for key, any case and
    spacing; 'not found' for none (a failed call: no rung, counted in tool_errors).

    >>> lookup(" Locker  7", [["locker 7", "kettle"], ["kettle", "34"]]), lookup("locker 1", [["locker 7", "x"]])
    ('kettle', 'not found')
    """
    pairs = [p for p in facts if isinstance(p, (list, tuple)) and len(p) == 2] if isinstance(facts, list) else []
    table = {" ".join(str(k).lower().split()): str(v) for k, v in pairs}  # a malformed pair is skipped, never raised
    return table.get(" ".join(key.lower().split()), "not found")


# FORK HERE: the tools. By --tools name: the tag of a call, the function that answers it, the system prompt's line
# that teaches it, a worked example (an earlier chat turn, as EXAMPLE), and optionally computes(input) -> bool: does
# an answered call do some work (the first rung; by default, its output is not its input) and grounded(input,
# result, known) -> 0, 1, 2: its work on what the question or earlier results gave (the upper rungs; grounded_input by
# default), and reads: the row's column that run(input, row[reads]) also gets (the state only the environment has).
# Adding a tool is a function and an entry here: environment, prompt, rewards and check_config read it.
TOOLS = {
    "calculator": {
        "tag": "calc", "run": calculator, "computes": has_operator, "grounded": grounded_arithmetic,
        "prompt": "You have a calculator: write <calc>expression</calc> and its result appears as <result>value</result>.",
        "example": ("What is 2 + 3 * 4?", "<reasoning>\n3 * 4 = <calc>3 * 4</calc><result>12</result>, and 2 + 12 = "
                    "<calc>2 + 12</calc><result>14</result>.\n</reasoning>\n<answer>\n14\n</answer>"),
    },
    "lookup": {
        "tag": "lookup", "run": lookup, "reads": "facts",
        "prompt": "You can look things up: write <lookup>key</lookup> and the value stored under that key appears as "
                  "<result>value</result>. A value may be a key to look up next.",
        "example": ("What is the price of the item in locker 3?", "<reasoning>\nLocker 3 holds <lookup>locker 3</lookup>"
                    "<result>lamp</result>, and the lamp costs <lookup>lamp</lookup><result>12</result>.\n</reasoning>"
                    "\n<answer>\n12\n</answer>"),
    },
}  # fmt: skip
TOOL_FAILED = ("error", "not found")  # a result that starts so is a failed call


def run_tool(tool: dict, text: str, row: dict | None) -> str:
    """The tool's answer to a call's input: run(text), or run(text, row[reads]) for a tool that reads its row."""
    return tool["run"](text, (row or {}).get(tool["reads"])) if "reads" in tool else tool["run"](text)


def tool_response(text: str, names: str = "", row: dict | None = None) -> str | None:
    """The <result>...</result> to append if `text` ends with a complete, unanswered call of one of the tools
    `names` (comma-separated; "" = every tool in TOOLS), answered from the question's row, else None.

    >>> tool_response("So 12 * 7 = <calc>12 * 7</calc>"), tool_response("<calc>1</calc><result>1</result>")
    ('<result>84</result>', None)
    """
    for tool in [TOOLS[name] for name in names.split(",")] if names else TOOLS.values():
        open_tag, close_tag = f"<{tool['tag']}>", f"</{tool['tag']}>"
        end = len(text) - len(close_tag)
        start = text.rfind(open_tag, 0, end)  # this call's, unless a closing tag follows it (it was an earlier call's)
        if text.endswith(close_tag) and start >= 0 and close_tag not in text[start:end]:
            return f"{TOOL_RESULT[0]}{run_tool(tool, text[start + len(open_tag) : end], row)}{TOOL_RESULT[1]}"
    return None


def answered_calls(completion: str, row: dict | None = None) -> list[tuple[str, str, str, bool]]:
    """(tag, input, result, computes: did it do work, see TOOLS) for each of the first 16 calls (bounded time) that
    its tool answered without failing, with the result it really returns from the question's row (a typed <result>
    counts only if the tool's).

    >>> answered_calls("<calc>6 * 7</calc><result>42</result> <calc>7</calc><result>7</result> <calc>1+</calc>")
    [('calc', '6 * 7', '42', True), ('calc', '7', '7', False)]
    """
    offered = (row or {}).get("tools") or ",".join(TOOLS)  # a tool not offered answered nothing: its call is typed
    by_tag = {TOOLS[name]["tag"]: TOOLS[name] for name in offered.split(",")}
    parts = re.split("<(" + "|".join(map(re.escape, by_tag)) + ")>", completion)  # text, tag, text after it, ...
    calls = []
    for tag, chunk in zip(parts[1:33:2], parts[2:33:2]):  # each call's tag and the text after its opening tag
        tool = by_tag[tag]
        expression, closed, rest = chunk.partition(f"</{tag}>")
        result = rest[len(TOOL_RESULT[0]) :].partition(TOOL_RESULT[1])[0] if rest.startswith(TOOL_RESULT[0]) else ""
        if not closed or result != run_tool(tool, expression, row) or result.startswith(TOOL_FAILED):
            continue  # no call, a result the tool did not return, or a failed call
        computes = tool["computes"](expression) if "computes" in tool else result.strip() != expression.strip()
        calls.append((tag, expression, result, computes))
    return calls


def result_number(text: str) -> float | None:
    """The number a tool's result is, whole (the calculator's form, 1e+20 too): None for 'Paris', 'box C4' (not 4),
    several numbers or junk, read without raising."""
    with contextlib.suppress(ValueError):
        return number_value(text.strip())
    return None


def grounded_results(completion: str, question: str, row: dict | None = None) -> list[tuple[float | None, int]]:
    """The rule every tool reward shares: (the number its result states, 1 or 2) for each answered call that computes
    and did grounded work by its tool's rule (TOOLS: grounded) on the question and earlier such results: only such a
    result may be built on (<calc>29928</calc> then 29928 - 86 would launder a guess).

    >>> grounded_results("<calc>6 * 7</calc><result>42</result> <calc>42</calc><result>42</result>", "6 boxes of 7")
    [(42.0, 2)]
    """
    rules = {tool["tag"]: tool.get("grounded", grounded_input) for tool in TOOLS.values()}
    known, grounded_calls = [question], []  # the texts a call may take its inputs from
    for tag, text, result, computes in answered_calls(completion, row):
        if computes and (level := rules[tag](text, result, known)):
            grounded_calls.append((result_number(result), level))
            known.append(result)
    return grounded_calls


def tool_reward(completion: str, answer: str, question: str = "", **kwargs) -> float:
    """1 for a right answer that a grounded call (grounded_results) computed: a bonus for a real computation, never
    for calling, so <calc>1200</calc>, <calc>-(-1200)</calc> and <calc>1199+1</calc> pay nothing for a guessed 1200.

    >>> tool_reward("<calc>6 * 7</calc><result>42</result> <answer>42</answer>", "42", question="6 boxes of 7")
    1.0
    >>> tool_reward("<calc>41 + 1</calc><result>42</result> <answer>42</answer>", "42", question="6 boxes of 7")
    0.0
    """
    if not correctness_reward(completion, answer):
        return 0.0
    stated = stated_number(extract_answer(completion) or "")
    return float(any(same_number(value, stated) for value, _ in grounded_results(completion, question, kwargs)))


def grounded_call_reward(completion: str, answer: str, question: str = "", **kwargs) -> float:
    """1 for a call of full grounded work (its tool's rule: 2; the calculator's, two different numbers), once per
    completion whatever the answer: a group in which one sample uses the question has a spread to learn from.
    More calls pay no more; <calc>347 - 347</calc>, bare or invented numbers, typed results, failed calls pay nothing.

    >>> grounded_call_reward("<calc>6 + 7</calc><result>13</result>", "42", question="6 boxes of 7")
    1.0
    """
    return float(any(level >= 2 for _, level in grounded_results(completion, question, kwargs)))


def answer_from_call_reward(completion: str, answer: str, question: str = "", **kwargs) -> float:
    """1 if the answer states the result of a call of full grounded work (as grounded_call_reward), right or wrong: it
    pays for carrying the tool's result into <answer> rather than a guess (only a right one adds correctness).

    >>> answer_from_call_reward("<calc>6 + 7</calc><result>13</result> <answer>13</answer>", "42", question="6, 7")
    1.0
    """
    stated = stated_number(extract_answer(completion) or "")
    return float(
        any(level >= 2 and same_number(v, stated) for v, level in grounded_results(completion, question, kwargs))
    )


def well_formed_call_reward(completion: str, answer: str, **kwargs) -> float:
    """The first rung: 1 for an answered call that computes, whatever its numbers and the answer, once per completion.
    It pays <calc>1 + 1</calc> too, by design: it teaches the syntax the grounded rewards need (a small model's first
    calls fail, as <calc>246 * 69 = 15812</calc>), and it weighs least, so using the question's numbers pays more.

    >>> well_formed_call_reward("<calc>2 + 2</calc><result>4</result>", "42"), well_formed_call_reward("<calc>4</calc>", "4")
    (1.0, 0.0)
    """
    return float(any(computes for *_, computes in answered_calls(completion, kwargs)))


# Added to REWARD_FUNCS when --tools is on, so that the single-turn job is unchanged. A ladder of partial credit,
# each rung paid only for the real thing: a call that computes (0.125), one on the question's numbers (0.25),
# its result as the answer (0.25), the right answer so computed (0.5). With every other term they stay below a
# right answer's 2.0 (test_right_answer_dominates), and each way of skipping the work pays less than doing it
# (test_no_attack_pays_as_much_as_the_work). Measured: without the first rung, SmolLM2-135M's calls faded.
TOOL_REWARD_FUNCS = [(tool_reward, 0.5), (grounded_call_reward, 0.25), (answer_from_call_reward, 0.25),
                     (well_formed_call_reward, 0.125)]  # fmt: skip


def tool_env(tok, max_calls: int, names: str = "calculator", rows: list[dict] | None = None):
    """--tools as the rollout's environment: step(ids, calls, b), given completion b's token ids and calls so far,
    returns the ids of <result>...</result> to append when its last token just closed a call of one of the tools
    `names`, answered from rows[b] (its question's row), else None. It decodes only to read the call and tokenizes
    only its reply: what the model wrote stays as sampled."""
    closes = {}  # token id -> does its text hold a '>'? Only such a token can end a closing tag
    close_tags = [f"</{TOOLS[name]['tag']}>" for name in names.split(",")]

    def step(ids: list[int], calls: int, b: int = 0) -> list[int] | None:
        if ids[-1] not in closes:
            closes[ids[-1]] = ">" in tok.decode(ids[-1:])
        if not closes[ids[-1]]:
            return None
        text, before = tok.decode(ids, skip_special_tokens=True), tok.decode(ids[:-1], skip_special_tokens=True)
        end = max((text.rfind(tag) + len(tag) for tag in close_tags if tag in text), default=-1)
        reply = tool_response(text[:end], names, rows[b] if rows else None) if end > len(before) else None  # closed now
        if reply is not None and calls >= max_calls:  # past the cap: an answer that says so, not silence
            reply = f"{TOOL_RESULT[0]}error: no calls left, at most {max_calls}{TOOL_RESULT[1]}"
        # '><' is one token in many vocabularies: the model may have begun the reply, write only the rest
        reply = reply and reply.removeprefix(text[end:])
        return tok(reply, add_special_tokens=False).input_ids if reply else None

    return step


def environment_turn(env, token, ended, turns: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Tools, at one decode step: each row's token (R,), sampled or the environment's, and by_env (R,). When a row's
    own token closes a call, env(its ids, its calls so far) returns the reply's ids, queued and written one per step
    in place of sampled tokens: they enter the KV cache as if sampled (ids in, ids out: nothing is re-tokenized) but
    by_env marks them, and the loss skips them. Reading the tokens costs a host sync per step: only tools pay it."""
    sampled, done = token.tolist(), ended.tolist()
    chosen, by_env = [], []
    for b, own in enumerate(sampled):
        forced = bool(turns["queue"][b]) and not done[b]
        chosen.append(turns["queue"][b].pop(0) if forced else own)
        by_env.append(forced)
        if done[b]:
            continue
        turns["ids"][b].append(chosen[-1])
        # the model wrote it: did it just close a call?
        if not forced and own not in turns["eos"] and (reply := env(turns["ids"][b], turns["calls"][b], b)):
            turns["queue"][b], turns["calls"][b] = list(reply), turns["calls"][b] + 1
    return torch.tensor(chosen, device=token.device), torch.tensor(by_env, device=token.device)


def tool_use(tok, completion_ids: torch.Tensor, lengths: torch.Tensor, by_env: torch.Tensor) -> tuple[list, list]:
    """Calls and failed calls per completion: each run of environment tokens is a reply, failed if its result starts
    with TOOL_FAILED (the model may have written the reply's first characters: read after its first '>')."""
    calls, errors = [], []
    for ids, n, env in zip(completion_ids.tolist(), lengths.tolist(), by_env.tolist()):
        runs = itertools.groupby(zip(ids[:n], env[:n]), key=lambda pair: pair[1])  # runs of one writer
        replies = [[token for token, _ in run] for written_by_env, run in runs if written_by_env]
        calls.append(len(replies))
        errors.append(sum(tok.decode(r).partition(">")[2].startswith(TOOL_FAILED) for r in replies))
    return calls, errors


# ----------------------------------------------------------------------------- LoRA (off by default): adapters, and pi_ref as adapters off
# --lora_rank r trains, in place of each weight W (out, in) of the decoder blocks' linear layers, a low-rank update
# (LoRA, arXiv 2106.09685):  y = W x + (alpha / r) B A x,  A (r, in) random, B (out, r) zero at the start, so the policy
# starts as the base model. W, the embeddings and the LM head are frozen (bf16 under --precision bf16); only A and B get
# gradients and AdamW state (fp32): rank 16 on Qwen2.5-7B trains 40M parameters, not 7.6B. Two copies go as well: pi_ref
# is the network with its adapters off (frozen_logprobs), and the policy itself samples (no bf16 copy). Each adapted
# nn.Linear keeps its name and weight, and a forward hook adds the update: the merged model saves as the base model did.
ADAPTERS = "adapters.safetensors"


def add_lora(model, cfg: Config, resume_from: str | None):
    """Freeze the model and give every linear layer of its decoder blocks (model.base_model: not the LM head) rank-r
    adapters (with resume_from, the checkpoint's). Returns pi_ref: the model itself, or None when beta is 0."""
    layers = [m for m in model.base_model.modules() if isinstance(m, torch.nn.Linear)]
    if not layers:
        fail(f"--lora_rank: {type(model).__name__} has no torch.nn.Linear layers in its decoder blocks to adapt "
             f"(some models use other layer types); drop --lora_rank to fine-tune every weight")  # fmt: skip
    model.requires_grad_(False)
    seed_everything(cfg.seed, "lora")  # the same A on every rank
    for linear in layers:
        A = torch.empty(cfg.lora_rank, linear.in_features, device=linear.weight.device)  # (r, in) fp32
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own initialization, as in the paper's code
        linear.lora_A = torch.nn.Parameter(A)
        linear.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, cfg.lora_rank, device=A.device))  # (out, r)
        linear.lora_scale, linear.lora_on = cfg.lora_alpha / cfg.lora_rank, True
        linear.lora_hook = linear.register_forward_hook(lora_forward)
    if resume_from:
        load_adapters(model, os.path.join(resume_from, ADAPTERS))
    if os.environ.get("RANK", "0") == "0":
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha:g} on {len(layers)} linear layers: {trained / 1e6:.2f}M "
              f"trained parameters of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")  # fmt: skip
    return model if cfg.beta != 0 else None


def lora_forward(linear, args, out):
    """The hook after an adapted layer: out = W x + b becomes W x + b + (alpha / r) B A x, unless adapters are off.
    The adapters compute in the input's dtype: bf16 under autocast or from a bf16 base, else fp32."""
    if not linear.lora_on:
        return out
    x = args[0]  # (.., in)
    if "lora_cast" in linear.__dict__:  # in rollout (sampling_adapters): 4 ops, not 12 (bench.py --decode_ops)
        A_t, B_t = linear.lora_cast  # (in, r), (r, out): the same sum, in place (no gradients in a rollout)
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ A_t, B_t)
        return out
    down = torch.nn.functional.linear(x, linear.lora_A.to(x.dtype))  # (.., r)
    return out + linear.lora_scale * torch.nn.functional.linear(down, linear.lora_B.to(x.dtype))  # (.., out)


@contextlib.contextmanager
def sampling_adapters(model):
    """Within one rollout, every adapted layer computes with A^T and (alpha / r) B^T cast once to its weights' dtype,
    not at every token, and the casts are dropped at its end: made anew by each rollout, they hold the adapters as
    they are (a cache kept across optimizer steps went stale: fused AdamW moves no tensor version counter)."""
    layers = lora_layers(model)
    for linear in layers:
        dtype = linear.weight.dtype  # outside autocast, the layer's input dtype: bf16 for a bf16 base
        linear.lora_cast = (linear.lora_A.to(dtype).t(), (linear.lora_scale * linear.lora_B).to(dtype).t())
    try:
        yield
    finally:
        for linear in layers:
            del linear.lora_cast


def lora_layers(model) -> list:
    """The adapted layers of a model (none for a model without LoRA)."""
    return [m for m in model.modules() if hasattr(m, "lora_A")]


@contextlib.contextmanager
def adapters_off(model):
    """Within it the model computes as its base model, pi_ref; a model without adapters is unchanged."""
    layers = lora_layers(model)
    for m in layers:
        m.lora_on = False
    try:
        yield
    finally:
        for m in layers:
            m.lora_on = True


@torch.no_grad()
def merge_lora(model) -> None:
    """W <- W + (alpha / r) B A in every adapted layer (B A in fp64, the sum in fp32, then the base dtype), and the
    adapters and their hooks go: a plain model that from_pretrained loads and any inference server serves."""
    for linear in lora_layers(model):  # fp64: exact whatever the matmul precision (TF32 on CUDA under bf16)
        delta = (linear.lora_B.double() @ linear.lora_A.double()).float()  # (out, in)
        linear.weight.copy_(linear.weight.float() + linear.lora_scale * delta)
        linear.lora_hook.remove()
        del linear.lora_A, linear.lora_B, linear.lora_hook, linear.lora_scale, linear.lora_on


def save_adapters(model, path: str) -> None:
    """path/adapters.safetensors: A and B of every layer under the layer's name, with r and alpha."""
    os.makedirs(path, exist_ok=True)
    layer = lora_layers(model)[0]
    r = layer.lora_A.shape[0]
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if ".lora_" in name}
    save_file(tensors, os.path.join(path, ADAPTERS), {"lora_rank": str(r), "lora_alpha": str(layer.lora_scale * r)})


def load_adapters(model, path: str) -> None:
    saved, names = load_file(path), {name for name, _ in model.named_parameters() if ".lora_" in name}
    if set(saved) != names:
        fail(f"{path} holds adapters for other layers than this model's: resume with the run's --model")
    model.load_state_dict(saved, strict=False)  # copies into A and B in place; the base weights are not in the file


# ----------------------------------------------------------------------------- Data: loading and checks, prompts
def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The train rows (none with --eval_only) and the first --eval_size test rows (all of them if negative)."""
    one_file = os.path.isfile(os.path.expanduser(cfg.dataset))  # its one split: training's, or --eval_only's
    train_rows = [] if cfg.eval_only else load_rows(cfg, "train")
    if cfg.eval_size == 0:
        return train_rows, []
    if one_file and not cfg.eval_only:
        print(f"evaluation off: {cfg.dataset} is one file, all of it for training; to evaluate, pass --dataset "
              f"a folder with train and test files (train.jsonl and test.jsonl)", file=sys.stderr)  # fmt: skip
        return train_rows, []
    return train_rows, load_rows(cfg, "train" if one_file else "test")[: cfg.eval_size if cfg.eval_size > 0 else None]


def load_rows(cfg: Config, split: str) -> list[dict]:
    """Rows of one split, each with its parsed 'gold' answer: from a local file or folder, or a hub dataset."""
    import datasets  # imported here: it is slow to import and only needed when loading data

    path, files = os.path.expanduser(cfg.dataset), None
    loaders = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # extension -> datasets' loader
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.startswith(split) and os.path.splitext(f)[1] in loaders)  # fmt: skip
        if not files:
            fail(f"no {split}.jsonl/.json/.parquet in folder {path}: add one, or pass another --dataset")
    elif os.path.isfile(path):
        if split != "train":
            fail(f"dataset file {path} has no {split} split: pass a folder with train and test files, or --eval_size 0")
        files = [path]
    elif looks_local(path):
        fail(f"dataset path {path} does not exist: pass an existing file or folder, or a hub id like openai/gsm8k")
    try:
        if files:  # the loader for their extension; all of their rows land in one "train" split
            ds = datasets.load_dataset(loaders[os.path.splitext(files[0])[1]], data_files=files, split="train")
        else:
            ds = datasets.load_dataset(path, cfg.dataset_config or None, split=split)
    except Exception as e:  # offline hub, bad file, unknown split: one line, not a traceback
        fail(f"could not load dataset {cfg.dataset!r} ({split}): {first_line(e)}. Check the path or hub id and your "
             f"network; offline, set HF_HUB_OFFLINE=1 and pass --dataset a local file or folder")  # fmt: skip
    if missing := {"question", "answer"} - set(ds.column_names):
        fail(f"dataset {cfg.dataset} lacks column(s) {sorted(missing)}; it has {ds.column_names}. "
             f"Rename them to question/answer")  # fmt: skip
    if missing := {TOOLS[t]["reads"] for t in cfg.tools.split(",") if "reads" in TOOLS.get(t, {})} - set(
        ds.column_names
    ):
        fail(f"--tools {cfg.tools} answers from each row's {', '.join(sorted(missing))}, and {cfg.dataset} has no such "
             f"column: pass a dataset with it (python make_lookup_task.py writes one for the lookup)")  # fmt: skip
    rows, bad = [], 0
    for row in ds:
        try:
            rows.append({**row, "gold": gold_answer(row["answer"])})
        except ValueError:
            bad += 1
    forms = "a solution ending in '#### <number>' (GSM8K) or one number such as 42 or \"1,234\""
    if not rows:
        fail(f"none of the {bad} answers in {cfg.dataset} ({split}) is {forms}: fix the answer column")
    if bad:
        print(f"skipped {bad} of {bad + len(rows)} {split} rows whose answer is not {forms}", file=sys.stderr)
    return rows


def gold_answer(answer) -> str:
    """The gold number of a dataset answer, commas dropped: the number after the last '####' of a GSM8K
    solution, or an answer that is one number (a string or a JSON number). ValueError otherwise.

    >>> gold_answer("3 + 4 = 7 apples\\n#### 1,007"), gold_answer(" 1,234 "), gold_answer(-3.5)
    ('1007', '1234', '-3.5')
    """
    text = str(answer).strip()
    head, sep, tail = text.rpartition("####")
    gold = tail.strip() if sep else text
    number = stated_number(gold) if sep else NUMBER.fullmatch(gold)  # a solution may wrap it: '#### $18'
    if number is None or isinstance(answer, bool):
        raise ValueError(f"no '#### <number>' at the end of, and not one number: {text[-60:]!r}")
    return gold.replace(",", "").replace("\u2212", "-")


def looks_local(path: str) -> bool:
    """A path the user meant as a local file or folder, not a hub id like 'org/name'."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith((".jsonl", ".json", ".parquet"))


def prompt_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Row indices start..start+count of an endless stream of seeded shuffles of range(n).
    The stream is a pure function of the position, so resuming needs only the step number."""
    epochs = range(start // n, (start + count - 1) // n + 1)  # the seeded shuffles that hold the rows asked for
    order = [i for e in epochs for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()]
    return order[start % n : start % n + count]


def build_prompt(tok, question: str, tools: str = "") -> str:
    """The chat prompt for one question (the model's own chat template when it has one). With tools (--tools
    names), the system prompt says how to call each, and each one's worked example is shown, in that order."""
    names = tools.split(",") if tools else []
    system = SYSTEM_PROMPT + "".join("\n" + TOOLS[name]["prompt"] for name in names)
    examples = [shot for shot in ([TOOLS[name]["example"] for name in names] if names else [EXAMPLE]) if shot]
    shots = [{"role": role, "content": text} for q, a in examples for role, text in (("user", q), ("assistant", a))]
    messages = [{"role": "system", "content": system}, *shots, {"role": "user", "content": question}]
    if tok.chat_template is None:  # a base model: plain text
        shown = "".join(f"Question: {q}\nAnswer:\n{a}\n\n" for q, a in examples)
        return f"{system}\n\n{shown}Question: {question}\nAnswer:\n"
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(tok, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask (N, P): generation continues from the right edge."""
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


# ----------------------------------------------------------------------------- Evaluation
def evaluate(sampler, tok, rows: list[dict], cfg: Config, step: int, device, rank=0, world=1,
             name: str = "") -> dict[str, float]:  # fmt: skip
    """Greedy pass@1 on `rows` (and maj@k / pass@k if --eval_samples k), sharded over ranks.
    Writes every completion to output_dir/<name>.jsonl (eval_<step>.jsonl by default) and returns eval/* metrics."""
    seed_everything(cfg.seed, rank, step, "eval")  # training steps seed themselves: evaluating changes nothing
    mine = list(enumerate(rows))[rank::world]
    records, k = [], cfg.eval_samples  # k > 0: also k samples per problem, at the training temperature
    batches = tqdm(range(0, len(mine), cfg.eval_batch_size), desc=f"eval {step}", unit="batch", leave=False,
                   disable=rank != 0, dynamic_ncols=True)  # fmt: skip
    for i in batches:
        index, batch = zip(*mine[i : i + cfg.eval_batch_size])
        questions = [r["question"] for r in batch]
        try:
            ro = generate(sampler, tok, questions, 1, 0.0, cfg, device, batch)  # greedy
            texts = generate(sampler, tok, questions, k, cfg.temperature, cfg, device, batch).texts if k > 0 else []
        except torch.OutOfMemoryError:
            fail(f"out of GPU memory evaluating at step {step}: lower --eval_batch_size (now {cfg.eval_batch_size}), "
                 f"--eval_samples or --max_new_tokens; the checkpoint in {cfg.output_dir} is intact")  # fmt: skip
        calls, errors = tool_use(tok, ro.completion_ids, ro.lengths, ro.by_env)
        for j, (idx, r, text, c, e) in enumerate(zip(index, batch, ro.texts, calls, errors)):
            gold = r["gold"]
            records.append({"index": idx, "question": r["question"], "gold": gold, "completion": text,
                            "extracted": extract_answer(text), "strict": correctness_reward(text, gold),
                            "lenient": lenient_correctness(text, gold), "format": format_reward(text, gold),
                            "tool_calls": c, "tool_errors": e})  # fmt: skip
            if k > 0:  # maj@k: the most common stated number (the first seen, on a tie); pass@k: any sample correct
                samples = texts[j * k : (j + 1) * k]
                votes = Counter(v for v in (stated_number(extract_answer(s) or "") for s in samples) if v is not None)
                records[-1]["maj"] = float(same_number(max(votes, key=votes.get, default=None), stated_number(gold)))
                correct = [correctness_reward(s, gold) for s in samples]  # each sample's: for pass@k of k' <= k
                records[-1].update({"pass": float(any(correct)), "correct_samples": int(sum(correct))})
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])

    def mean(key: str, over: str = "") -> float:  # over every problem, or (over="tool_calls") over the calls
        return sum(r[key] for r in records) / max(1, sum(r[over] for r in records) if over else len(records))

    metrics = {"eval/accuracy_strict": mean("strict"), "eval/accuracy_lenient": mean("lenient"),
               "eval/format": mean("format")}  # fmt: skip
    if cfg.tools:  # calls per problem, and the share of calls that failed
        metrics.update({"eval/tool_calls": mean("tool_calls"), "eval/tool_errors": mean("tool_errors", "tool_calls")})
    if k > 0:
        metrics.update({f"eval/maj@{k}": mean("maj"), f"eval/pass@{k}": mean("pass")})
    if rank == 0:
        with open(os.path.join(cfg.output_dir, f"{name or f'eval_{step}'}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return metrics


def evaluate_only(sampler, tok, test_rows, cfg: Config, device, rank: int, world: int, tracker, log) -> None:
    """--eval_only: evaluate into evaluation.jsonl and .json, which training never writes: safe in a run's folder."""
    metrics = evaluate(sampler, tok, test_rows, cfg, 0, device, rank, world, "evaluation") if test_rows else {}
    log(" | ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" | {len(test_rows)} problems")
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "evaluation.json"), "w") as f:
            json.dump({"model": cfg.model, "problems": len(test_rows), **metrics}, f, indent=1)
    if tracker is not None:
        tracker.log(metrics)
        tracker.finish()
    if world > 1:
        end_distributed()


def lenient_correctness(completion: str, answer: str) -> float:
    """1 if correctness_reward is 1 (so lenient >= strict) or the last number anywhere in the text is the gold one.

    >>> lenient_correctness("so the total is 1,234 apples", "1234")
    1.0
    """
    numbers = NUMBER.findall(completion)
    last = number_value(numbers[-1]) if numbers else None
    return max(correctness_reward(completion, answer), float(same_number(last, stated_number(answer))))


# ----------------------------------------------------------------------------- Setup: config checks, model, precision, CUDA
def check_config(cfg: Config) -> None:
    """Stop with one line on a bad value or combination of flags, before anything is loaded."""
    if cfg.group_size < 2:
        fail(f"--group_size {cfg.group_size}: GRPO compares completions within a group, use 2 or more")
    if cfg.loss_type not in LOSS_TYPES:
        fail(f"unknown --loss_type {cfg.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.temperature <= 0:
        fail(f"--temperature {cfg.temperature}: sampling needs a temperature above 0")
    for name in ("save_every", "sample_every", "eval_every", "eval_samples"):
        if getattr(cfg, name) < 0:
            fail(f"--{name} {getattr(cfg, name)}: use 0 (off) or a positive number")
    for name in cfg.tools.split(",") if cfg.tools else []:
        if name not in TOOLS:
            fail(f"unknown --tools {name!r}: use {', '.join(TOOLS)} (comma-separated), or leave it empty for none")
    if cfg.max_tool_calls < 0:
        fail(f"--max_tool_calls {cfg.max_tool_calls}: use 0 or more")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        fail(f"unknown --precision {cfg.precision!r}: use auto, fp32 or bf16")
    if cfg.micro_batch_size == 0 or cfg.micro_batch_size < -1:
        fail(f"--micro_batch_size {cfg.micro_batch_size}: use a positive number, or -1 for the whole batch")
    if cfg.plain and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the plain update knows no ranks
        fail("--plain trains in one process, through the plain forms alone: run it with python, not torchrun")
    if cfg.plain and cfg.precision == "bf16":  # its log-probs come from the model's own head: bf16 under autocast
        fail("--plain computes in fp32 (under bf16 its LM head would round what the default's fp32 head computes "
             "exactly): drop --precision bf16, or drop --plain")  # fmt: skip
    if cfg.report_to not in ("none", "wandb", "trackio"):  # the two trackers share init(), log() and finish()
        fail(f"unknown --report_to {cfg.report_to!r}: use none, wandb, trackio")
    if cfg.lora_rank < 0:
        fail(f"--lora_rank {cfg.lora_rank}: use a positive rank such as 16, or 0 to fine-tune every weight")
    if cfg.lora_rank and cfg.lr != Config.lr:  # one rate per run, named by what it trains
        fail(f"--lr sets full fine-tuning's learning rate; with --lora_rank pass --lora_lr "
             f"(default {Config.lora_lr:g})")  # fmt: skip
    if not cfg.lora_rank and cfg.lora_lr != Config.lora_lr:
        fail("--lora_lr sets the adapters' learning rate, and --lora_rank is 0: add --lora_rank, or pass --lr")
    if cfg.lora_rank and cfg.lora_alpha <= 0:
        fail(f"--lora_alpha {cfg.lora_alpha}: the adapters' scale alpha / r must be positive; 32 is common")
    if cfg.lora_rank and cfg.eval_only:
        fail("--eval_only evaluates --model as it is, without adapters: drop --lora_rank "
             "(a LoRA run's final/ is merged)")  # fmt: skip
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:  # an optional package
        fail(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed; pip install "
             f"{cfg.report_to}, or drop --report_to")  # fmt: skip


def load_model(name: str, cfg: Config, device):
    """A causal LM on the device, in fp32 (the master weights: bf16 compute comes from autocast), and its tokenizer."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path) and looks_local(path):
        fail(f"model folder {name} does not exist: pass --model an existing folder or a hub id like "
             f"Qwen/Qwen2.5-0.5B-Instruct")  # fmt: skip
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"could not load model {name!r}: {first_line(e)} Check the name and your network (offline: "
             f"HF_HUB_OFFLINE=1), or pass a local folder")  # fmt: skip
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: masks come from lengths, never from token values
    if cfg.lora_rank and use_bf16(cfg, device):  # LoRA's frozen base is only read: bf16, cast here on the host,
        bf16_weights(model)  # so the GPU never holds the fp32 weights (28 GiB for 7B)
    model.to(device)
    if device.type == "cpu":  # own, aligned memory: CPU matmuls round by alignment, and resumes must be bit-exact
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()  # .data: a swap autograd does not see
    return model, tok


# Seconds per step on a CPU, per parameter and per completion token: 22.09 s for SmolLM2-135M (134.5M parameters)
# at 2 x 8 completions of 64 tokens on 2 cores (bench.py --job, fp32; docs/performance.md), and 44 s for 4 x 8 of 64
# (the README's learning run): 1.6e-10 both times. A rule of thumb for the order of magnitude, not a prediction.
CPU_SECONDS_PER_PARAM_TOKEN = 1.6e-10


def warn_if_slow_on_cpu(cfg: Config, model_path: str, device: torch.device, rank: int = 0) -> None:
    """On a CPU, a job sized for a GPU (the default: 0.5B parameters, 16 x 8 completions of up to 400 tokens) would
    run for an hour before its first line of progress: say so before loading the weights, name the tiny CPU run, and
    change nothing (under --eval_only no step is trained: no warning). The size comes from the config alone (a model on
    the meta device: no memory, no weights read)."""
    if device.type != "cpu" or rank != 0 or cfg.eval_only:
        return
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(model_path), trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception:  # no config to be had: load_model says why, in its own words
        return
    tokens = cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens  # completion tokens per step, at most
    minutes = CPU_SECONDS_PER_PARAM_TOKEN * params * tokens / 60
    if minutes >= 5:
        print(f"warning: this job is sized for a GPU: on a CPU each step takes about {minutes:.0f} min ({params / 1e6:.0f}M "
              f"parameters, {cfg.prompts_per_step} x {cfg.group_size} completions of up to {cfg.max_new_tokens} tokens; "
              f"about {CPU_SECONDS_PER_PARAM_TOKEN:.1e} s per parameter per token, measured on 2 cores), {cfg.steps} "
              f"steps. A first run on a CPU: python grpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --device cpu "
              f"--steps 10 --prompts_per_step 2 --group_size 4 --max_new_tokens 64 --eval_size 8 --output_dir out-cpu",
              file=sys.stderr, flush=True)  # fmt: skip


def use_bf16(cfg, device) -> bool:
    """--precision auto is bf16 on CUDA from compute capability 8.0 (A100, RTX 30xx and later), else fp32 (and under
    --plain, which computes in fp32): bf16 matmuls are slow on most CPUs, and below 8.0 flash and memory-efficient
    attention refuse bf16 (torch's sdp_utils.cpp), leaving the math kernel's full (B, heads, L, L) scores: slow, and
    far above bench.py --memory's prediction."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return not cfg.plain and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def describe_precision(cfg, device) -> str:
    """The device line's account of --precision: what it chose, and on CUDA why; warns of bf16 below capability 8.0."""
    bf16 = use_bf16(cfg, device)
    what = "bf16 compute over fp32 weights, bf16 sampler" if bf16 else "fp32"
    what = "bf16 frozen base, fp32 adapters, the policy samples" if bf16 and cfg.lora_rank else what
    if device.type != "cuda":
        return what + (" (auto: bf16 only on CUDA)" if cfg.precision == "auto" else "")
    major, minor = torch.cuda.get_device_capability(device)
    if cfg.precision == "bf16" and major < 8:
        print(f"warning: --precision bf16 on a card of compute capability {major}.{minor}: below 8.0 attention runs "
              f"bf16 on its slow math kernel; --precision fp32 is faster here", file=sys.stderr)  # fmt: skip
    if cfg.precision == "auto":  # --plain computes in fp32 (check_config)
        why = (
            "--plain"
            if cfg.plain
            else f"compute capability {major}.{minor}; bf16 from 8.0, where fast attention takes it"
        )
        what += f" (auto: {why})"
    return what


def setup_cuda(device: torch.device, cfg: Config) -> None:
    """Every CUDA-only setting, in one place (a CPU test calls it with a CUDA device and the CUDA calls mocked).
    - The allocator grows its segments instead of carving fixed blocks, which the KV cache, growing a token at a
      time, fragments. Read once, at the first CUDA allocation; a user's own setting (either name) wins.
    - The current device is `device`: allocations and syncs that name no device go to it, not to GPU 0. A device
      without an index (--device cuda) means the current one: torch.cuda.set_device refuses it (torch/cuda/_utils.py).
    - No cuDNN attention, SDPA's first pick on sm90+ since torch 2.11: its backward returns NaN grad_q for an explicit
      mask with a key length of 64 mod 128 (pytorch/pytorch#196678; Qwen2.5 hits it, huggingface/trl#7181).
    - Under bf16, TF32 for fp32 matmuls, then the LM head's alone: ~8x true fp32's speed (~1.4 s of a default step
      on an H100, by arithmetic), for 0.0005 nats of log-prob error on average (bench.py --head_precision, on a CPU:
      docs/performance.md). Under --precision fp32 every matmul stays exact."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # the older name, which torch still reads (with a warning)
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
    torch.backends.cuda.enable_cudnn_sdp(False)  # flash and memory-efficient attention serve instead
    torch.backends.cuda.matmul.fp32_precision = "tf32" if use_bf16(cfg, device) else "ieee"  # after the allocator


def autocast(device, bf16: bool):
    """bf16 compute over the fp32 master weights (and fp32 AdamW state), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ----------------------------------------------------------------------------- Checkpoints
RESUME_MUST_MATCH = ("model", "dataset", "dataset_config", "seed", "prompts_per_step", "group_size")  # the data stream
NOT_RESUMED = ("output_dir", "resume", "eval_only", "device", "trust_remote_code")  # this process's, not the run's


def read_checkpoint(cfg: Config, given: set[str] | None) -> tuple[Config, dict | None]:
    """With --resume, the saved configuration and the checkpoint's trainer state (plain data: step, optimizer and
    schedule state, config), else (cfg, None); each flag given (main's `given`) takes effect, all named in one line,
    or is refused if it cannot (the data order). check_output_dir reports no checkpoint, once the data is checked."""
    resume_from = latest_checkpoint(cfg.output_dir)
    if not cfg.resume or cfg.eval_only or resume_from is None:
        return cfg, None
    path = os.path.join(resume_from, "trainer_state.pt")
    try:  # weights_only: tensors, numbers, strings and containers only, so a shared checkpoint runs no code
        state = torch.load(path, map_location="cpu", weights_only=True)  # cpu: the optimizer moves it to its device
    except pickle.UnpicklingError as e:  # torch names what it refused, e.g. "GLOBAL os.system"
        refused = re.search(r"GLOBAL (\S+)", str(e))
        fail(f"{path} holds more than data ({refused.group(1) if refused else 'a pickled object'}), and loading it "
             f"could run code: refused. Resume only from checkpoints that grpo.py wrote")  # fmt: skip
    now = dataclasses.asdict(cfg)
    if given is None:  # main(Config(...)) from Python: a field set away from its default counts as given
        given = {f.name for f in dataclasses.fields(Config) if now[f.name] != f.default}
    saved = {k: v for k, v in state["config"].items() if k in now and k not in NOT_RESUMED}
    changed = [k for k in now if k in given and k in saved and saved[k] != now[k]]
    if refused := [k for k in RESUME_MUST_MATCH if k in changed]:
        fail(f"--resume with changed {', '.join(f'--{k}' for k in refused)}: the checkpoint's data order and "
             f"batches depend on them; use the original values or another --output_dir")  # fmt: skip
    for name in ("lora_rank", "lora_alpha"):  # adapters fit only the rank and scale they were trained with
        was = saved.get(name, 0 if name == "lora_rank" else now[name])  # older checkpoints: full fine-tuning
        if name in given and was != now[name] and (name == "lora_rank" or saved.get("lora_rank")):
            fail(f"--resume with --{name} {now[name]}: {resume_from} was trained with --{name} {was} "
                 f"(--lora_rank 0: full fine-tuning); drop --{name}, or pass another --output_dir")  # fmt: skip
    cfg = Config(**{**now, **{k: v for k, v in saved.items() if k not in given}})
    if state["step"] > cfg.steps:  # a larger --steps extends a run; a smaller one has nothing to do
        fail(f"--steps {cfg.steps} is below the checkpoint's step {state['step']}: pass a larger --steps to train on")
    if changed and os.environ.get("RANK", "0") == "0":  # rank 0 (torchrun sets RANK; no process group yet)
        print("resume: " + ", ".join(f"--{k} {saved[k]!r} -> {now[k]!r}" for k in changed))
    return cfg, state


def check_output_dir(cfg: Config) -> str | None:
    """The checkpoint folder to continue from; None for a new run or an evaluation. A new run refuses a
    folder that holds another run's checkpoint, so it is never resumed by mistake."""
    resume_from = latest_checkpoint(cfg.output_dir)
    if cfg.resume and resume_from is None:
        fail(f"--resume: no checkpoint in {cfg.output_dir}: drop --resume, or pass the --output_dir of the run")
    if not cfg.resume and resume_from is not None and not cfg.eval_only:
        fail(f"{resume_from} holds an earlier run: pass --resume to continue it, or another --output_dir")
    return resume_from if cfg.resume and not cfg.eval_only else None


def resume_state(state: dict | None, optimizer, scheduler, cfg: Config, rank: int) -> tuple[int, int]:
    """(step, skipped updates) to start from: 0 and an empty metrics.jsonl for a new run; a resumed one gets back the
    optimizer state and schedule position as saved, with the run's --lr and --weight_decay, and forgets later logged
    steps. No random state is restored: every step seeds itself from (seed, rank, step), on any number of ranks."""
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if state is None:
        if rank == 0:
            open(metrics_path, "w").close()
        return 0, 0
    optimizer.load_state_dict(state["optimizer"])  # AdamW's moments, and the saved lr and weight decay...
    scheduler.load_state_dict(state["scheduler"])  # ...and the count of applied updates (warmup)
    lr = optimizer.defaults["lr"]  # ...replaced by this run's (--lr or --lora_lr, as setup_training chose)
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(lr=lr * rate(scheduler.last_epoch), initial_lr=lr, weight_decay=cfg.weight_decay)
    if rank == 0 and os.path.exists(metrics_path):  # forget steps logged after the checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= state["step"]]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    return state["step"], state["skipped"]


def save_checkpoint(cfg: Config, model, tok, optimizer, scheduler, step: int, skipped: int, rank: int):
    """output_dir/checkpoint: weights, optimizer and schedule state, the step and the config; enough
    for --resume to continue exactly (rank 0 writes it: the weights are the same on every rank)."""
    if rank == 0:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "skipped": skipped, "config": dataclasses.asdict(cfg)}  # fmt: skip
        save_atomically(os.path.join(cfg.output_dir, "checkpoint"), model, tok, state)
        plot_metrics(cfg.output_dir)


def save_atomically(path: str, model, tok, trainer_state: dict | None = None) -> None:
    """Write model + tokenizer (+ trainer state) to path.tmp, then swap it in for path.
    A crash at any moment leaves either the old or the new folder complete (see latest_checkpoint)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora_layers(model):  # LoRA: the adapters alone; the base model is --model, unchanged
        save_adapters(model, tmp)
    else:
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    for name in os.listdir(tmp):  # make sure the bytes are on disk before the folder counts as complete
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(path):  # path is complete, so an old copy is not needed: keep path until tmp replaces it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)  # from here on path is complete
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint folder: 'checkpoint', or 'checkpoint.old' if a crash hit mid-swap."""
    folders = [os.path.join(output_dir, name) for name in ("checkpoint", "checkpoint.old")]
    return next((path for path in folders if os.path.isfile(os.path.join(path, "trainer_state.pt"))), None)


def seed_everything(*key) -> None:
    """Seed Python and torch (CPU and every GPU) from a key such as (seed, rank, step)."""
    random.seed("/".join(map(str, key)))  # a str seed is hashed (sha512): each key its own stream
    torch.manual_seed(random.getrandbits(63))


# ----------------------------------------------------------------------------- torchrun
def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process per device, nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"unknown --device {cfg.device!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {cfg.device}: CUDA is not available here; use --device cpu or install a CUDA build of torch")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else device.index or 0)
        setup_cuda(device, cfg)
    if world > 1 and not dist.is_initialized():
        # transformers imports torch.distributed.nn when it loads its first model, and that module's functions take
        # the default process group as a default argument: imported after init, they would keep the group alive past
        # destroy_process_group, its threads running into interpreter exit (an abort there). So import it first.
        import transformers.modeling_utils  # noqa: F401

        cuda = device.type == "cuda"  # device_id: NCCL binds this rank's communicator to its GPU at once
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return (dist.get_rank() if world > 1 else 0), world, device


def reduce_metrics(sums: dict[str, list[float]], world: int, device) -> dict[str, float]:
    """sums maps a name to [total, count]; returns total/count over all ranks (count-weighted means)."""
    names = sorted(sums)
    t = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=device).view(-1, 2)  # (M, 2)
    if world > 1:
        dist.all_reduce(t)
    return {k: (t[i, 0] / t[i, 1].clamp(min=1e-12)).item() for i, k in enumerate(names)}


def end_distributed() -> None:
    """Wait for every rank (rank 0 may still be saving), then take the process group down. On gloo
    with monitored_barrier: barrier() can free earlier collectives' tensors after exit has begun."""
    (dist.monitored_barrier if dist.get_backend() == "gloo" else dist.barrier)()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- Logging and plots
def log_step(bar, m: dict, cfg: Config, bf16: bool, question: str, texts: list[str], rewards: torch.Tensor,
             tracker=None) -> None:  # fmt: skip
    """Rank 0's record of a step m: one |-separated line (and one for an evaluation), every --sample_every
    steps the question with its best and worst completion, and a line of metrics.jsonl (and the tracker's)."""
    rewards_part = " ".join(f"{k[7:].removesuffix('_reward')} {v:.2f}" for k, v in m.items() if k.startswith("reward/"))
    parts = [f"step {m['step']}/{cfg.steps}", f"reward {m['reward']:.3f} ({rewards_part})", f"acc {m['accuracy']:.3f}",
             f"kl {m['kl']:.4f}", f"loss {m['loss']:.4f}", f"clip {m['clip_frac']:.3f}",
             f"zero_std {m['frac_zero_std']:.2f}", f"len {m['completion_len']:.0f}", f"trunc {m['truncated_frac']:.2f}"]  # fmt: skip
    if bf16:  # in fp32 the sampler is the policy itself: no mismatch to show
        parts.append(f"mismatch {m['logp_mismatch']:.4f}")
    if "tool_calls" in m:
        parts.append(f"tools {m['tool_calls']:.2f} err {m['tool_errors']:.2f}")
    bar.write(" | ".join([*parts, f"{m['step_time']:.1f}s", f"{m['tokens_per_s']:.0f} tok/s"]))
    group = rewards[: cfg.group_size]  # the first question's group
    if cfg.sample_every and m["step"] % cfg.sample_every == 0 and group.min() < group.max():
        best, worst = int(group.argmax()), int(group.argmin())
        bar.write(f"--- question: {question}\n--- best (reward {group[best]:.2f}):\n{texts[best]}\n"
                  f"--- worst (reward {group[worst]:.2f}):\n{texts[worst]}\n---")  # fmt: skip
    if evals := [f"{k} {v:.3f}" for k, v in m.items() if k.startswith("eval/")]:
        bar.write(" | ".join([f"eval step {m['step']}", *evals]))
    write_metrics(cfg, m, tracker)


def rollout_metrics(ro, mask, rewards: torch.Tensor, per_fn: dict, rows: list[dict], tok, cfg: Config) -> dict:
    """What to watch in a step, as this rank's sums {name: [total, count]} (main averages them over ranks); mask
    (B, L): the tokens the model wrote (completion_mask)."""
    n, G = float(len(ro.texts)), cfg.group_size
    sums = {
        "reward": [rewards.sum().item(), n],
        "accuracy": [sum(correctness_reward(t, r["gold"]) for t, r in zip(ro.texts, rows)), n],
        "completion_len": [mask.sum().item(), n],
        "truncated_frac": [(~ro.ended).sum().item(), n],
        "frac_zero_std": [(rewards.view(-1, G).std(1) == 0).sum().item(), n / G],  # groups without signal
    }
    sums.update({f"reward/{k}": [sum(v), n] for k, v in per_fn.items()})
    if cfg.tools:
        calls, errors = tool_use(tok, ro.completion_ids, ro.lengths, ro.by_env)
        sums["tool_calls"], sums["tool_errors"] = [sum(calls), n], [sum(errors), sum(calls)]  # errors: share of calls
    return sums


def finish_run(cfg: Config, model, tok, rank: int, world: int, tracker, log) -> None:
    """After the last step: the model to output_dir/final and the plot (rank 0), the tracker closed, the group down."""
    if rank == 0:
        if cfg.lora_rank:  # the adapters alone (small), then final/ is the merged model: a plain one
            save_atomically(os.path.join(cfg.output_dir, "adapters"), model, tok)
            merge_lora(model)
        save_atomically(os.path.join(cfg.output_dir, "final"), model, tok)
        plot_metrics(cfg.output_dir)
        log(f"saved {os.path.join(cfg.output_dir, 'final')} (AutoModelForCausalLM.from_pretrained loads it)")
    if tracker is not None:
        tracker.finish()
    if world > 1:
        end_distributed()


def write_metrics(cfg: Config, record: dict, tracker=None) -> None:
    """A line of metrics.jsonl, and the same record to the --report_to tracker if there is one."""
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if tracker is not None:  # the step as the tracker's own step, not a metric (trackio reserves the name)
        tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def start_tracker(cfg: Config, rank: int):
    """Rank 0 starts a run of the --report_to tracker, named after --output_dir, with the config; returns the
    tracker module (for log and finish), or None on other ranks and without --report_to."""
    if rank != 0 or cfg.report_to == "none":
        return None
    tracker = importlib.import_module(cfg.report_to)  # imported only when asked for: an optional dependency
    tracker.init(project="grpo", name=os.path.basename(os.path.abspath(cfg.output_dir)), config=dataclasses.asdict(cfg))
    return tracker


def plot_metrics(output_dir: str) -> None:
    """metrics.png: the panels below against step, from metrics.jsonl."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure to close
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("no metrics.png: pip install matplotlib to get plots", file=sys.stderr)
        return
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    panels = [
        ("reward (weighted total)", ["reward"]),
        ("reward per function (unweighted)", sorted({k for r in records for k in r if k.startswith("reward/")})),
        ("accuracy", ["accuracy", "eval/accuracy_strict", "eval/accuracy_lenient", "eval/format"]),
        ("what to watch: shares that should stay low", ["frac_zero_std", "truncated_frac"]),
        ("KL to reference", ["kl"]),
        ("completion length (tokens)", ["completion_len"]),
    ]
    fig = Figure(figsize=(15, 7))
    for ax, (title, keys) in zip(fig.subplots(2, 3).flat, panels):
        for k in keys:
            points = [(r["step"], r[k]) for r in records if k in r]
            if points:
                ax.plot(*zip(*points), marker="o" if k.startswith("eval/") else None, ms=4, label=k)
        ax.set(title=title, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no tick at step 1.5
        if "shares" in title:  # on the whole 0-1 scale, where 1 means no group has a signal, or every answer is cut off
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "metrics.png"), dpi=100)


# ----------------------------------------------------------------------------- Command line
def parse_config(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """Every Config field becomes a --flag; its help text is the comment on its line (else its name). Returns the
    config and the names of the flags given on the command line (on --resume, only they change the run)."""
    helps = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))
    # argument_default=SUPPRESS: only the flags given land in args, and Config's own defaults fill in the rest
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False,  # --step is an error, not --steps
                                     epilog="Flags take dashes as well: --group-size 4 is --group_size 4.")  # fmt: skip
    parser.error = fail  # a bad value is one line too, without the usage text
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}  # --x / --no-x
        parser.add_argument(f"--{f.name}", **kind, help=f"{helps.get(f.name, f.name)} (default: {f.default!r})")
        if "_" in f.name:  # the dashed spelling, left out of --help so that it lists each flag once
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, **kind, help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        fail(unknown_flag(unknown[0]))
    return Config(**vars(args)), set(vars(args))


def unknown_flag(arg: str) -> str:
    """What to say about a command-line word that is no flag: the nearest flag, when one is near."""
    name = arg.partition("=")[0]
    if not name.startswith("-"):
        return f"unexpected argument {arg!r}: every setting is a --flag (python grpo.py --help)"
    flags = [f"--{no}{f.name}" for f in dataclasses.fields(Config) for no in (["", "no-"] if f.type is bool else [""])]
    by_words = {flag.lstrip("-").replace("-", "_"): flag for flag in flags}  # --no-scale_rewards: no_scale_rewards
    near = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), by_words, n=1)
    return f"unknown flag {name}: " + (f"did you mean {by_words[near[0]]}?" if near else "see python grpo.py --help")


def fail(message: str):
    """Stop with one line on stderr (no traceback) and exit status 1."""
    raise SystemExit(f"error: {message}")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


if __name__ == "__main__":
    cfg, given = parse_config()
    main(cfg, given=given)
