"""Tests for grpo.py: offline, CPU, a few minutes. Run: python -m pytest -q test_grpo.py

They build a tiny randomly initialized Llama and a character-level tokenizer (pad == eos, as in
many chat models) in a temporary folder, so nothing is downloaded. The integration test runs only
when GRPO_TEST_MODEL (a model folder) and GRPO_TEST_DATA (a dataset path) are set.
"""

import argparse
import ast
import builtins
import contextlib
import dataclasses
import functools
import gc
import glob
import importlib.util
import inspect
import io
import itertools
import json
import math
import operator
import os
import random
import re
import shutil
import string
import subprocess
import sys
import time
import types
import warnings
import zlib
from unittest import mock

import pytest
import torch

import grpo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- fixtures
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|unk|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))  # no merges: one token per character
    t.decoder = decoders.Fuse()
    t.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|unk|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(path: str, config_class, model_class, **extra) -> str:
    """A 2-layer random model with the character tokenizer (pad token = EOS token), saved to path."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **extra,
    )
    model = model_class(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama with a character tokenizer whose pad token is its EOS token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-model")), LlamaConfig, LlamaForCausalLM)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    """A 2-layer random Qwen2 shaped like the default model in the ways that matter for dtypes:
    q/k/v biases (Qwen2 always has them), grouped-query attention (4 heads, 2 KV heads), rope theta
    1e6, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = save_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen")), Qwen2Config, Qwen2ForCausalLM, rope_theta=1e6)
    assert Qwen2ForCausalLM.from_pretrained(path).model.layers[0].self_attn.q_proj.bias is not None
    return path


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"question": f"{a}+{b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A dataset folder in GSM8K's format: train.jsonl and test.jsonl of 1-digit additions."""
    path = tmp_path_factory.mktemp("tiny-data")
    write_jsonl(path / "train.jsonl", arithmetic_rows(64, seed=1))
    write_jsonl(path / "test.jsonl", arithmetic_rows(6, seed=2))
    return str(path)


def tiny_config(tiny_model, tiny_data, tmp_path, **kw) -> grpo.Config:
    base = dict(
        model=tiny_model,
        dataset=tiny_data,
        output_dir=str(tmp_path / "out"),
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        lr=1e-3,
        warmup_steps=0,
        eval_size=3,
        eval_every=0,
        eval_batch_size=2,
        save_every=0,
        sample_every=0,
        device="cpu",
        seed=0,
    )
    base.update(kw)
    if base.get("lora_rank"):  # the adapters' rate is --lora_lr; --lr is full fine-tuning's
        base["lora_lr"] = base.pop("lr")
    return grpo.Config(**base)


def cpu_seconds(fn, *args):
    """fn(*args) and the CPU seconds it took in this thread, with garbage collection paused. A wall clock
    would also count time the cores spent on other processes, and a full collection of the test
    process's heap (about 100 ms with torch, transformers and datasets loaded), which a call that
    allocates can trigger: neither is the function's cost, and both failed these bounds under load."""
    gc.disable()
    try:
        t0 = time.thread_time()
        out = fn(*args)
        return out, time.thread_time() - t0
    finally:
        gc.enable()


def read_metrics(cfg) -> list[dict]:
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The tests that hold a fast path equal to its plain form run on GRPO_TEST_DEVICE (cpu unless set): .ci/gpu runs
# them on CUDA, whose kernels (attention, matmuls, the chunked head) compute differently from the CPU's.
DEVICE = torch.device(os.environ.get("GRPO_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session", autouse=True)
def cuda_settings():
    """With GRPO_TEST_DEVICE=cuda the suite runs under grpo.py's CUDA settings (setup_cuda: cuDNN attention off as in
    training, the allocator, the device), those of a --precision fp32 run: TF32 off, so the fp32 forms meet the same
    1e-5 tolerances as on a CPU (TF32 keeps 10 mantissa bits, ~1e-3 relative). A bf16 run adds TF32 for its fp32 LM
    head alone, measured apart: bench.py --head_precision."""
    if DEVICE.type == "cuda":
        grpo.setup_cuda(DEVICE, grpo.Config(precision="fp32"))


def to_device(*items):
    """Models and tensors moved to DEVICE, in order."""
    return tuple(x.to(DEVICE) for x in items)


def load(path, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    return model.eval(), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- rewards
GOOD = "<reasoning>\n9 + 9 = 18\n</reasoning>\n<answer>\n18\n</answer>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        ("<answer>18</answer>", 1.0),
        ("<answer>\n18.0\n</answer>", 1.0),
        ("<answer>$18</answer>", 1.0),
        ("<answer>18.</answer>", 1.0),
        ("<answer>17</answer>", 0.0),
        ("<answer>18, 19</answer>", 0.0),  # listing several numbers is not an answer
        ("<answer>18 or 19</answer>", 0.0),
        ("<answer>eighteen</answer>", 0.0),
        ("<answer>18", 0.0),  # unclosed
        ("18", 0.0),  # right number, no answer block
        ("<answer>17</answer> <answer>18</answer>", 1.0),  # the last block counts
        ("<answer>18</answer> <answer>17</answer>", 0.0),
        ("", 0.0),
        ("<answer></answer>", 0.0),
        ("</answer><answer>", 0.0),
    ],
)
def test_correctness_reward(completion, expected):
    assert grpo.correctness_reward(completion, "18") == expected


def test_correctness_reward_thousands_and_negative():
    assert grpo.correctness_reward("<answer>1,234</answer>", "1234") == 1.0
    assert grpo.correctness_reward("<answer>1234</answer>", "1234") == 1.0
    assert grpo.correctness_reward("<answer>12,34</answer>", "1234") == 0.0  # not a thousands separator
    assert grpo.correctness_reward("<answer>-5</answer>", "-5") == 1.0
    assert grpo.correctness_reward("<answer>5</answer>", "-5") == 0.0
    assert grpo.correctness_reward("<answer>1 8</answer>", "18") == 0.0  # two numbers, not 18
    assert grpo.correctness_reward("<answer> $ 18 </answer>", "18") == 1.0


# Inside <answer>: one stated number counts however it is wrapped; two or more, or none, never count.
WRAPPED = [
    ("\\boxed{18}", "18", 1.0),
    ("$\\boxed{18}$", "18", 1.0),
    ("**18**", "18", 1.0),
    ("$18$", "18", 1.0),
    ("\\(18\\)", "18", 1.0),
    ("18%", "18", 1.0),
    ("18 apples", "18", 1.0),
    ("x = 18", "18", 1.0),
    ("+18", "18", 1.0),
    ("\u221218", "-18", 1.0),  # the unicode minus
    ("\u221218", "18", 0.0),
    ("-18", "18", 0.0),
    ("The answer is **$1,234.00**.", "1234", 1.0),
    ("\\boxed{\\text{18 dollars}}", "18", 1.0),
    ("\\boxed{17}", "18", 0.0),
    ("18 or 19", "18", 0.0),
    ("2 + 16 = 18", "18", 0.0),
    ("18, 19", "18", 0.0),
    ("5-18", "18", 0.0),  # a range, not -18
    ("1e400", "1", 0.0),
    ("1.2.3", "1.2", 0.0),
    ("\\boxed{}", "18", 0.0),
    ("**eighteen**", "18", 0.0),
    ("", "18", 0.0),
]


@pytest.mark.parametrize("inner, gold, expected", WRAPPED)
def test_wrapped_answers_score(inner, gold, expected):
    completion = f"<reasoning>\nwork\n</reasoning>\n<answer>\n{inner}\n</answer>"
    assert grpo.correctness_reward(completion, gold) == expected
    one_number = grpo.stated_number(inner)
    assert grpo.int_answer_reward(completion, gold) == float(one_number is not None and one_number == int(one_number))
    assert grpo.lenient_correctness(completion, gold) >= grpo.correctness_reward(completion, gold)


@pytest.mark.parametrize(
    "inner, expected",
    [
        ("\\boxed{" * 50_000 + "18" + "}" * 50_000, 1.0),  # deeply nested braces
        ("*" * 100_000 + "18" + "*" * 100_000, 1.0),
        ("18 " + "apples " * 20_000, 1.0),
        ("\u2212" * 100_000 + "18", 0.0),
        ("18 " + "1," * 50_000, 0.0),
        ("{" * 100_000, 0.0),
    ],
)
def test_wrapped_answers_hostile_and_fast(inner, expected):
    completion = f"<answer>{inner}</answer>"
    (correct, lenient, _), seconds = cpu_seconds(
        lambda: [
            f(completion, "18") for f in (grpo.correctness_reward, grpo.lenient_correctness, grpo.int_answer_reward)
        ]
    )
    assert correct == expected and lenient >= expected
    assert seconds < 0.5


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        (GOOD + "\n", 1.0),  # one trailing newline allowed
        (GOOD + "\n\n", 0.0),
        (GOOD + " extra", 0.0),
        ("x" + GOOD, 0.0),
        (GOOD.replace("\n</reasoning>", "</reasoning>"), 0.0),
        ("<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>", 1.0),  # empty blocks still have the layout
        (GOOD + "\n<answer>\n18\n</answer>", 0.0),  # a tag twice
        ("<answer>\n18\n</answer>", 0.0),
        ("", 0.0),
        ("\n", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert grpo.format_reward(completion, "18") == expected


def test_partial_credit_rewards():
    assert grpo.soft_format_reward("Sure! <reasoning>a</reasoning>  <answer>b</answer> bye", "1") == 1.0
    assert grpo.soft_format_reward("<answer>b</answer><reasoning>a</reasoning>", "1") == 0.0  # wrong order
    assert grpo.soft_format_reward("<reasoning>a</reasoning>", "1") == 0.0
    assert grpo.int_answer_reward("<answer>7</answer>", "3") == 1.0
    assert grpo.int_answer_reward("<answer>7.5</answer>", "3") == 0.0
    assert grpo.int_answer_reward("<answer>seven</answer>", "3") == 0.0
    assert grpo.tag_count_reward(GOOD, "18") == 1.0
    assert grpo.tag_count_reward("<reasoning>", "18") == 0.25
    assert grpo.tag_count_reward(GOOD + "x" * 101, "18") == 0.75  # text after </answer> costs a quarter
    assert grpo.tag_count_reward(GOOD + "x", "18") == 0.75 and grpo.tag_count_reward(GOOD + "\n", "18") == 1.0
    assert grpo.tag_count_reward("", "18") == 0.0


ADVERSARIAL = [
    "",
    "\x00\n\t" * 1000,
    "<answer>" * 50_000,
    "</answer>" * 50_000,
    "<reasoning>\n" * 20_000 + "\n</reasoning>\n<answer>\n" * 20_000 + "\n</answer>" * 20_000,
    "<answer>" + "9" * 100_000 + "</answer>",
    "<answer>" + "1," * 50_000 + "</answer>",
    "1" * 200_000,
    "-" * 100_000 + "1",
    "<answer>" + ("1" * 50 + ".") * 2000 + "</answer>",
    "\ud800 invalid surrogate <answer>5</answer>",
    "<answer>nan</answer>",
    "<answer>1e400</answer>",
    "<answer>" + "\\boxed{" * 50_000 + "5" + "}" * 50_000 + "</answer>",
    "<answer>" + "\u2212+" * 50_000 + "5</answer>",
    "<answer>" + "." * 100_000 + "5</answer>",
]


@pytest.mark.parametrize("fn", [f for f, _ in grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS] + [grpo.lenient_correctness])
def test_rewards_never_raise_and_are_fast(fn):
    """Every reward, called as training calls it (a length reward gets its token count), on hostile text."""
    keywords = {} if fn is grpo.lenient_correctness else {"question": "q", "tokens": 400, "max_tokens": 400}
    for text in ADVERSARIAL:
        value, seconds = cpu_seconds(lambda c, a: fn(c, a, **keywords), text, "5")
        assert isinstance(value, float) and math.isfinite(value)
        assert seconds < 0.5, f"{fn.__name__} is slow on a {len(text)}-char string"


def test_parse_gsm8k_answer_and_lenient():
    assert grpo.gold_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert grpo.gold_answer("... #### 1,200") == "1200"
    assert grpo.gold_answer("#### -3") == "-3"
    for bad in ("no marker here", "#### ", "#### many"):
        with pytest.raises(ValueError):
            grpo.gold_answer(bad)
    assert grpo.lenient_correctness("So 3 + 4 = 7.", "7") == 1.0
    assert grpo.lenient_correctness("7 apples, then 8", "7") == 0.0
    assert grpo.lenient_correctness("no numbers", "7") == 0.0
    assert grpo.lenient_correctness("The total is 42, done", "42") == 1.0
    assert grpo.lenient_correctness("3, 4, 1,234", "1234") == 1.0


def test_default_rubric_has_no_hair_thin_differences():
    """Advantages divide by the group's reward spread: eight wrong answers that differ only in a few
    characters after </answer> must score alike, or the hair becomes a full-size signal."""
    wrong = "<reasoning>\n9 + 9 = 17\n</reasoning>\n<answer>\n17\n</answer>\n"
    group = [wrong + tail for tail in ["ok", "okay", "x", "xx", "xxx", "done.", "a b c", "!!"]]
    rewards, _ = grpo.score(group, [{"question": "9 + 9?", "gold": "18"}] * 8, grpo.REWARD_FUNCS, [40] * 8, 400)
    assert len(set(rewards.tolist())) == 1
    assert (grpo.group_advantages(rewards, 8) == 0).all()


def test_score_weights_and_names(monkeypatch):
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(grpo.correctness_reward, 2.0), (grpo.format_reward, 0.5)])
    rows = [{"question": "q", "answer": "#### 18", "gold": "18"}] * 2
    total, per_fn = grpo.score([GOOD, "<answer>18</answer>"], rows, grpo.REWARD_FUNCS, [30, 20], 400)
    assert total.tolist() == [2.5, 2.0]
    assert per_fn == {"correctness_reward": [1.0, 1.0], "format_reward": [1.0, 0.0]}


# ----------------------------------------------------------------------------- tools
@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", "7"),  # precedence
        ("(1 + 2) * 3", "9"),
        ("10 - 4 - 3", "3"),  # left to right
        ("2 ** 3 ** 2", "512"),  # right to left
        ("-3 ** 2", "-9"),  # ** binds tighter than unary minus, as in Python
        ("(-3) ** 2", "9"),
        ("-(-5)", "5"),
        ("+7 - -2", "9"),
        ("((((2))))", "2"),
        ("7 / 2", "3.5"),  # true division
        ("6 / 3", "2"),  # an integral quotient prints as an integer
        ("1 / 3", "0.333333"),
        ("2 / 3", "0.666667"),
        ("-1 / 8", "-0.125"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("-7 % 3", "2"),
        ("7.5 % 2", "1.5"),
        ("2 ** -1", "0.5"),
        ("2 ** 0.5", "1.414214"),
        ("0 ** 0", "1"),
        ("(-1) ** 1000001", "-1"),
        ("0.1 + 0.2", "0.3"),
        ("2.50 * 2", "5"),
        ("3.14159 * 2", "6.28318"),
        ("0.0000001", "0"),
        ("-0.0000001", "0"),  # not '-0'
        ("0.00001", "0.00001"),  # not '1e-05'
        ("347 × 86", "29842"),
        ("84 ÷ 4", "21"),
        ("5 − 7", "-2"),
        ("−(3 − 5)", "2"),
        ("  12 *\t3 ", "36"),
        ("\n3 +\n4\n", "7"),
        ("123456789 * 987654321", "121932631112635269"),  # exact integers
        ("2 ** 99", str(2**99)),
        ("10 ** 30", "1" + "0" * 30),  # the largest allowed magnitude
        ("-(10 ** 30)", "-1" + "0" * 30),
        ("10 ** 30 / 10", "1" + "0" * 29),  # exact, not a rounded float
        ("1000000000000 / 3", "333333333333.333"),  # 15 significant digits, no float noise
        ("100000000000000000000 + 0.5", "1e+20"),
        ("1+" * 99 + "1", "100"),  # 199 characters, 99 levels deep
        ("(" * 99 + "1" + ")" * 99, "1"),  # parentheses add no depth to the tree
    ],
)
def test_calculator_arithmetic(expression, expected):
    assert grpo.calculator(expression) == expected


HOSTILE = [
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "lambda: 1",
    "(x := 1)",
    "[c for c in ()]",
    "{1: 2}",
    "a.b",
    "x[0]",
    "x",
    "__builtins__",
    "'abc'",
    "f'{1}'",
    "True",
    "None",
    "1j",
    "1 < 2",
    "1 if 1 else 2",
    "1 and 2",
    "~1",
    "1 & 2",
    "1 << 100",
    "2 ^ 3",
    "[1] * 10**9",
    "'a' * 10**9",
    "9**9**9",
    "10**10**6",
    "2**100000",
    "(10**30)**(10**30)",
    "0.1**-1000",
    "(-2)**1e30",
    "(-8) ** 0.5",  # a complex number
    "10**30 + 1",
    "10**30 * 10**30",
    "10**15*" * 20 + "1",
    "1e309",
    "9" * 199,
    "1/0",
    "1%0",
    "1//0",
    "0 ** -1",
    "1.5 % 0",
    "",
    "   ",
    "1 +",
    "1 2",
    "import os",
    "1; 2",
    "1\x00",
    "\ud800",
    "(" * 10_000 + "1" + ")" * 10_000,
    "1+" * 50_000 + "1",
    "-" * 100_000 + "1",
    "-" * 150 + "1",
    "1" * 100_000,
]


@pytest.mark.parametrize("expression", HOSTILE, ids=lambda e: repr(e[:30]) + (f"...{len(e)}" if len(e) > 30 else ""))
def test_calculator_rejects_hostile_input_quickly(expression):
    result, elapsed = cpu_seconds(grpo.calculator, expression)
    assert result.startswith("error: ") and len(result) < 80, result
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms"


@pytest.mark.parametrize(
    "expression, expected",
    [  # the model reads these, so they should say what went wrong
        ("x", "error: Name is not allowed"),
        ("'abc'", "error: Constant is not allowed"),
        ("1 < 2", "error: Compare is not allowed"),
        ("2 ^ 3", "error: ^ is not an operator here, use ** for powers"),
        ("1 % 0", "error: division by zero"),
        ("9**9**9", "error: result too large"),
        ("(-8) ** 0.5", "error: not a real number"),
        ("1 +", "error: invalid syntax"),
        ("-" * 150 + "1", "error: too deeply nested"),
        ("1" * 201, "error: longer than 200 characters"),
    ],
    ids=lambda v: v[:24],
)
def test_calculator_error_messages(expression, expected):
    assert grpo.calculator(expression) == expected


def test_calculator_runs_no_code(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    attacks = [
        f"open({str(target)!r}, 'w').write('x')",
        f"__import__('os').system('touch {target}')",
        f"__import__('pathlib').Path({str(target)!r}).touch()",
        f"[].__class__.__base__.__subclasses__() or open({str(target)!r}, 'w')",
    ]
    compiled = []

    def only_ast(source, filename, mode, flags=0, *args, **kwargs):  # ast.parse goes through compile()
        compiled.append(flags)
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    real_compile = builtins.compile
    monkeypatch.setattr(builtins, "compile", only_ast)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    for attack in attacks:
        assert len(attack) <= grpo.CALC_MAX_CHARS  # parsed and walked, not just refused for its length
        assert grpo.calculator(attack).startswith("error: "), attack
    assert grpo.calculator("2 * 21") == "42"
    assert not target.exists()
    assert compiled and all(flags & ast.PyCF_ONLY_AST for flags in compiled)  # a syntax tree, never bytecode


def test_calculator_matches_python_on_random_arithmetic():
    rng = random.Random(0)
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
           "**": operator.pow}  # fmt: skip

    def expression(depth: int) -> tuple[str, int | str]:
        """Random integer arithmetic and its value by Python, or the error the calculator must give."""
        if depth == 0 or rng.random() < 0.3:
            n = rng.randint(-99, 99)
            return (str(n) if n >= 0 else f"({n})"), n  # (-3) ** 2, not -(3 ** 2)
        op = rng.choice(list(ops))
        (left, a), (right, b) = expression(depth - 1), expression(0) if op == "**" else expression(depth - 1)
        if op == "**":
            right, b = str(abs(b) % 6), abs(b) % 6
        if isinstance(a, str) or isinstance(b, str):  # the first error, left to right
            return f"({left} {op} {right})", a if isinstance(a, str) else b
        if op in ("//", "%") and b == 0:
            return f"({left} {op} {right})", "error: division by zero"
        value = ops[op](a, b)
        return f"({left} {op} {right})", value if abs(value) <= 10**30 else "error: result too large"

    counts = {"value": 0, "error": 0}
    for _ in range(1000):
        text, expected = expression(4)
        if len(text) <= 200:
            assert grpo.calculator(text) == str(expected), text
            counts["error" if isinstance(expected, str) else "value"] += 1
    assert counts["value"] > 300 and counts["error"] > 10, counts
    for _ in range(2000):  # random junk from the calculator's own alphabet: always a string, never an exception
        text = "".join(rng.choice("0123456789.+-*/%()^ ×÷−e_xj") for _ in range(rng.randint(0, 40)))
        assert isinstance(grpo.calculator(text), str)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So 12 * 7 = <calc>12 * 7</calc>", "<result>84</result>"),
        ("<calc>2 + 3</calc>", "<result>5</result>"),
        ("<calc>1</calc><result>1</result> and <calc>2 × 3</calc>", "<result>6</result>"),  # a second call
        ("<calc>1+<calc>2</calc>", "<result>2</result>"),  # the last opening tag counts
        ("<calc></calc>", "<result>error: invalid syntax</result>"),
        ("<calc>x</calc>", "<result>error: Name is not allowed</result>"),  # errors go back to the model
        ("<calc>1/0</calc>", "<result>error: division by zero</result>"),
        ("<calc>2 + 3</calc><result>5</result>", None),  # already answered
        ("<calc>2 + 3</calc> so", None),
        ("<calc>2 + 3", None),  # not closed yet
        ("<calc>1</calc> then 2 * 3</calc>", None),  # a closing tag with no opening of its own
        ("2 * 3</calc>", None),
        ("</calc>", None),
        ("", None),
        ("no tools here", None),
    ],
)
def test_tool_response(text, expected):
    assert grpo.tool_response(text) == expected


CRATES = "A crate holds 347 apples. How many apples are in 86 crates?"  # gold 29842


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<calc>347 * 86</calc><result>29842</result>\n<answer>\n29842\n</answer>", 1.0),
        ("<calc>347*86</calc><result>29842</result> so <answer>\\boxed{29,842}</answer>", 1.0),  # wrapped
        ("<calc>347 \u00d7 86</calc><result>29842</result> <answer>29842</answer>", 1.0),  # the unicode sign
        ("<calc>-347 * -86</calc><result>29842</result> <answer>29842</answer>", 1.0),  # signs are arithmetic
        ("<calc>347 * 86</calc><result>29842</result> <answer>29843</answer>", 0.0),  # not the result
        ("<calc>347 * 68</calc><result>23596</result> <answer>23596</answer>", 0.0),  # a real call, a wrong answer
        ("<calc>2 + 2</calc><result>5</result> <answer>5</answer>", 0.0),  # a result the model typed: wrong
        ("<calc>347 * 86</calc><result>29841</result> <answer>29841</answer>", 0.0),  # typed, and wrong
        ("</calc><result>29842</result> <answer>29842</answer>", 0.0),  # no call at all
        ("<answer>29842</answer>", 0.0),  # right but no call: correctness pays for that
        ("<calc>1/0</calc><result>error: division by zero</result> <answer>29842</answer>", 0.0),
        ("<calc>347 * 86</calc><result>29842</result>" * 50 + "<answer>29842</answer>", 1.0),  # 50 calls: still 1
        (
            "<calc>1+1</calc><result>2</result>" * 20
            + "<calc>347*86</calc><result>29842</result><answer>29842</answer>",
            0.0,
        ),  # past the first 16 calls  # fmt: skip
        ("<calc>29842</calc><result>29842</result> <answer>29842</answer>", 0.0),  # a number copied through
        ("<calc>29842 * 1</calc><result>29842</result> <answer>29842</answer>", 0.0),  # no arithmetic done
        ("<calc>(29842) + 0</calc><result>29842</result> <answer>29842</answer>", 0.0),
        (
            "<calc>29842</calc><result>29842</result> <calc>347 * 86</calc><result>29842</result> <answer>29842</answer>",
            1.0,
        ),  # fmt: skip
        # a guessed 29842 dressed up as a computation: none of these did the question's arithmetic
        ("<calc>--29842</calc><result>29842</result> <answer>29842</answer>", 0.0),
        ("<calc>-(-29842)</calc><result>29842</result> <answer>29842</answer>", 0.0),
        (
            "<calc>29_842</calc><result>error: write numbers as plain decimals, like 1200 or 0.5</result> "
            "<answer>29842</answer>",
            0.0,
        ),  # fmt: skip
        ("<calc>29_842</calc><result>29842</result> <answer>29842</answer>", 0.0),
        ("<calc>2.9842e4</calc><result>29842</result> <answer>29842</answer>", 0.0),
        ("<calc>0x7492</calc><result>29842</result> <answer>29842</answer>", 0.0),
        ("<calc>29841+1</calc><result>29842</result> <answer>29842</answer>", 0.0),  # 29841 and 1 are invented
        ("<calc>347 * 80 + 347 * 6</calc><result>29842</result> <answer>29842</answer>", 0.0),  # 80 and 6 too
    ],
)
def test_tool_reward_pays_only_a_right_answer_the_calculator_computed(completion, expected):
    assert grpo.tool_reward(completion, "29842", question=CRATES) == expected


def test_tool_reward_follows_results_from_call_to_call():
    question = "Tom has 3 bags of 12 apples and eats 5. How many are left?"
    chained = "<calc>3 * 12</calc><result>36</result> then <calc>36 - 5</calc><result>31</result> <answer>31</answer>"
    assert grpo.tool_reward(chained, "31", question=question) == 1.0  # 36 is the first call's result
    assert (
        grpo.tool_reward("<calc>36 - 5</calc><result>31</result> <answer>31</answer>", "31", question=question) == 0.0
    )
    assert grpo.tool_reward(chained, "31") == 0.0  # without the question, no number is known


@pytest.mark.parametrize("expression", ["1_200", "12e2", "1.5e3", "1.2E3", "0x4B0", "0o2260", "0b10010110000", "1_2.5"])
def test_calculator_reads_plain_decimal_numbers_only(expression):
    assert grpo.calculator(expression) == "error: write numbers as plain decimals, like 1200 or 0.5"
    assert grpo.calculator("1200 + .5 - 0.5 + 5. - 5") == "1200"  # decimals in every written form still work


def test_tool_reward_only_with_tools(tiny_model, tiny_data, tmp_path):
    for tools in ("", "calculator"):
        cfg = tiny_config(tiny_model, tiny_data, tmp_path / (tools or "none"), tools=tools, steps=1, eval_size=0)
        grpo.main(cfg)
        assert ("reward/tool_reward" in read_metrics(cfg)[-1]) == bool(tools)


def test_tool_response_long_inputs_are_fast():
    for text in ["x" * 1_000_000 + "</calc>", "<calc>" * 200_000 + "</calc>", "</calc>" * 200_000,
                 "<calc>" + "1+" * 500_000 + "1</calc>", "<calc>" + "9" * 10**6 + "</calc>"]:  # fmt: skip
        result, seconds = cpu_seconds(grpo.tool_response, text)
        assert result is None or result.startswith("<result>error: ")
        assert seconds < 0.05


# ----------------------------------------------------------------------------- GRPO math
def test_group_advantages():
    """The paper's baseline by value: A = (r - group mean) / (group std + eps). A fork that changes the baseline
    (README, Fork it: leave-one-out) changes this test with it."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    a = grpo.group_advantages(r, 4)
    g = r[:4]
    assert torch.allclose(a[:4], (g - g.mean()) / (g.std(unbiased=True) + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: zero advantage, not NaN
    assert torch.allclose(grpo.group_advantages(r, 4, scale_by_std=False)[:4], g - 0.5)
    assert torch.allclose(
        grpo.group_advantages(r, 2)[:2], torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-4)
    )  # unbiased std of (1, 0)


def random_batch(B=4, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, L, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, L, generator=g)
    ref = logp.detach() + 0.3 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([L, 1, 3, L - 1][:B])
    return logp, old, ref, adv, grpo.completion_mask(lengths, L)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_loss_matches_direct_formula(loss_type):
    logp, old, ref, adv, mask = random_batch()
    eps, eps_high, beta, max_tokens = 0.2, 0.28, 0.04, 10
    loss, stats = grpo.grpo_loss(logp, old, ref, adv, mask, eps, beta, loss_type, max_tokens, eps_high)
    # the same objective, one token at a time, in float64
    per_seq, total, n_tokens = [], 0.0, 0
    for i in range(logp.shape[0]):
        terms = []
        for t in range(int(mask[i].sum())):
            lp, o, r, a = float(logp.detach()[i, t]), float(old[i, t]), float(ref[i, t]), float(adv[i])
            rho = math.exp(lp - o)
            kl = math.exp(r - lp) - (r - lp) - 1
            terms.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps_high) * a) - beta * kl)
        per_seq.append(sum(terms) / len(terms))
        total += sum(terms)
        n_tokens += len(terms)
    J = {"grpo": sum(per_seq) / len(per_seq), "dapo": total / n_tokens, "dr_grpo": total / (len(per_seq) * max_tokens)}
    assert loss.item() == pytest.approx(-J[loss_type], rel=1e-5)
    assert stats["kl"].item() >= 0


def test_grpo_loss_is_reinforce_when_ratio_is_one():
    """With rho = 1 (old = current) and beta = 0, the gradient is the REINFORCE gradient
    -1/B sum_i A_i/|o_i| sum_t grad logp_it, for each normalization."""
    logp, _, _, adv, mask = random_batch()
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -(adv[:, None] * mask) / mask.sum(1, keepdim=True) / logp.shape[0]
    assert torch.allclose(grad, expected, atol=1e-7)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -(adv[:, None] * mask) / mask.sum(), atol=1e-7)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, loss_type="dr_grpo", max_tokens=9)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -(adv[:, None] * mask) / (logp.shape[0] * 9), atol=1e-7)


def test_kl_term():
    """The k3 estimator's value and gradient. A fork that changes the estimator (README, Fork it: k2) changes
    this test, and the k3 written again in plain_objective, with it."""
    logp, _, ref, adv, mask = random_batch()
    _, stats = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.1)
    assert stats["kl"].item() == 0.0  # ref == policy
    _, stats = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1)
    assert stats["kl"].item() > 0
    # gradient of the k3 term alone: d/dlogp [exp(ref-logp) - (ref-logp) - 1] = 1 - exp(ref-logp)
    zero = torch.zeros_like(adv)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), ref, zero, mask, beta=0.1, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logp)
    expected = 0.1 * (1 - torch.exp(ref - logp.detach())) * mask / mask.sum()
    assert torch.allclose(grad, expected, atol=1e-7)


def test_clipped_tokens_get_no_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]])).requires_grad_()
    # ratios 2.0, 0.5, 1.1, 0.5 against old probabilities 0.25, 1.0, 0.4545, 1.0
    old = torch.log(torch.tensor([[0.25, 1.0, 0.5 / 1.1, 1.0]]))
    mask = torch.ones(1, 4)
    # A > 0: ratio 2.0 is above 1 + eps, clipped -> no gradient; 0.5 is below 1 - eps but min() keeps it
    loss, stats = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), mask, clip_eps=0.2, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0 and grad[0, 3] != 0
    assert stats["clip_frac"].item() == pytest.approx(0.25)
    # A < 0: now the ratios below 1 - eps are the clipped ones
    loss, stats = grpo.grpo_loss(logp, old, None, torch.tensor([-1.0]), mask, clip_eps=0.2, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] != 0 and grad[0, 1] == 0 and grad[0, 2] != 0 and grad[0, 3] == 0
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    # clip-higher: with eps_high = 1.5 the ratio 2.0 is inside the range again
    loss, _ = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), mask, clip_eps=0.2, beta=0.0, clip_eps_high=1.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] != 0


def test_grpo_loss_rejects_unknown_loss_type():
    logp, old, ref, adv, mask = random_batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo.grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")


# ----------------------------------------------------------------------------- log-probs, masks, rollouts
def test_token_logprobs_with_left_padding_match_unpadded(tiny_model):
    """Two prompts of different lengths (left-padded, pad == eos), two completions each sharing the
    prompt's cache: every row equals the log-softmax of the model run on that row alone, unpadded."""
    model, tok = load(tiny_model)
    prompts = ["<|im_start|>user\n1+2?<|im_end|>\n", "hi"]
    ids, mask = grpo.tokenize_prompts(tok, prompts, "cpu")
    assert mask[1, 0] == 0 and mask[0].all() and ids[1, 0] == tok.eos_token_id  # left padding, with the EOS id
    eos = tok.eos_token_id
    completion = torch.tensor([[5, 6, 7, eos], [9, eos, eos, eos], [8, eos, eos, eos], [10, 11, 12, 13]])
    index = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        batched = grpo.token_logprobs(model, ids, mask, completion, index, temperature=0.7)
        for b in range(4):
            alone = torch.tensor([tok(prompts[index[b]], add_special_tokens=False).input_ids])
            full = torch.cat([alone, completion[b : b + 1]], 1)
            logits = model(full).logits[0, alone.shape[1] - 1 : -1].float() / 0.7
            direct = logits.log_softmax(-1).gather(-1, completion[b][:, None]).squeeze(-1)
            assert torch.allclose(batched[b], direct, atol=1e-5)


def logprobs_and_grad(model, *args, **kw):
    logp = grpo.token_logprobs(model, *args, **kw)
    (grad,) = torch.autograd.grad(
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum(), model.model.layers[0].self_attn.q_proj.weight
    )
    return logp.detach(), grad


def test_shared_prompt_cache_equals_full_sequences_with_gradients(tiny_model):
    model, tok = load(tiny_model)
    model.train()
    ids, mask = grpo.tokenize_prompts(tok, ["abc", "de"], "cpu")
    completion = torch.randint(3, 90, (6, 5), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    shared = logprobs_and_grad(model, ids, mask, completion, index, 1.0)
    model.activation_checkpointing_enable({"use_reentrant": False})  # forces the full-sequence path
    full = logprobs_and_grad(model, ids, mask, completion, index, 1.0)
    assert torch.allclose(shared[0], full[0], atol=1e-5) and torch.allclose(shared[1], full[1], atol=1e-5)


def test_chunked_logprobs_equal_unchunked_and_gradients_match(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = grpo.tokenize_prompts(tok, ["abc", "de"], "cpu")
    completion = torch.randint(3, 90, (4, 7), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 0, 1, 1])
    whole = logprobs_and_grad(model, ids, mask, completion, index, 1.0, chunk=10_000)
    chunked = logprobs_and_grad(model, ids, mask, completion, index, 1.0, chunk=3)
    assert torch.allclose(whole[0], chunked[0], atol=1e-6) and torch.allclose(whole[1], chunked[1], atol=1e-6)


def test_completion_mask_from_lengths():
    m = grpo.completion_mask(torch.tensor([3, 0, 5]), 5)
    assert m.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def plain_generate(model, tok, ids, mask, G, max_new_tokens):
    """The reference path: every prompt repeated G times through model.generate (greedy)."""
    out = model.generate(
        input_ids=ids.repeat_interleave(G, 0),
        attention_mask=mask.repeat_interleave(G, 0),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    return out[:, ids.shape[1] :]


def test_fast_rollout_equals_generate_greedy(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = grpo.tokenize_prompts(
        tok, [grpo.build_prompt(tok, q) for q in ["1+1?", "what is 12 + 30?", "9?"]], "cpu"
    )
    model, ids, mask = to_device(model, ids, mask)
    eos = grpo.eos_ids(model, tok)
    out, lengths, ended, _, _ = grpo.rollout(model, ids, mask, 2, 12, 0.0, eos, tok.pad_token_id)
    with torch.no_grad():
        ref = plain_generate(model, tok, ids, mask, 2, 12)
    for b in range(out.shape[0]):
        n = int(lengths[b])
        assert out[b, :n].tolist() == ref[b, :n].tolist()
        if ended[b]:
            assert out[b, n - 1] == tok.eos_token_id  # the EOS that ended it is inside the length


def test_rollout_lengths_masks_with_pad_equal_eos(tiny_model):
    """pad == eos: lengths include the ending EOS; everything after it is padding, whatever its value."""
    model, tok = load(tiny_model)
    assert tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    # make EOS likely so that completions end at different places
    with torch.no_grad():
        model.lm_head.weight[eos] += 0.4 * model.lm_head.weight.mean(0)
        model.model.norm.weight.fill_(1.0)
    bias = torch.zeros(len(tok))
    bias[eos] = 3.0
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    torch.manual_seed(0)
    ids, mask = grpo.tokenize_prompts(
        tok, [grpo.build_prompt(tok, "a"), grpo.build_prompt(tok, "longer question")], "cpu"
    )
    out, lengths, ended, _, _ = grpo.rollout(model, ids, mask, 8, 10, 1.0, [eos], tok.pad_token_id)
    hook.remove()
    assert ended.any() and (lengths > 1).any() and len(set(lengths.tolist())) > 1
    for b in range(out.shape[0]):
        n = int(lengths[b])
        row = out[b].tolist()
        if ended[b]:
            assert row[n - 1] == eos and eos not in row[: n - 1]  # ends at its first EOS, which is kept
            assert all(t == tok.pad_token_id for t in row[n:])
        else:
            assert n == 10 and eos not in row
    m = grpo.completion_mask(lengths, out.shape[1])
    assert m.sum(1).tolist() == lengths.tolist()


def test_rollout_ignore_eos_runs_full_length(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = grpo.tokenize_prompts(tok, ["x"], "cpu")
    out, lengths, ended, _, _ = grpo.rollout(
        model, ids, mask, 3, 6, 1.0, list(range(len(tok))), tok.pad_token_id, ignore_eos=True
    )
    assert out.shape == (3, 6) and lengths.tolist() == [6, 6, 6] and not ended.any()


def test_micro_batched_gradient_equals_full_batch(tiny_model):
    model, tok = load(tiny_model)
    model.train()
    prompts = [grpo.build_prompt(tok, q) for q in ["1+1?", "22+3?", "7?"]]
    ids, mask = grpo.tokenize_prompts(tok, prompts, "cpu")
    model, ids, mask = to_device(model, ids, mask)
    G = 2
    out, lengths, _, _, _ = grpo.rollout(model, ids, mask, G, 8, 1.0, grpo.eos_ids(model, tok), tok.pad_token_id)
    lengths[0] = 2  # make lengths differ so every normalization is exercised
    adv = torch.randn(6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        logp = grpo.token_logprobs(model, ids, mask, out, torch.arange(6, device=DEVICE) // G, 1.0)
        ref, old = (
            logp + 0.1 * torch.randn(out.shape, device=DEVICE),
            logp + 0.1 * torch.randn(out.shape, device=DEVICE),
        )
    for loss_type in grpo.LOSS_TYPES:
        cfg = grpo.Config(loss_type=loss_type, beta=0.04, max_new_tokens=8)
        grads = []
        for mb in (6, 4, 1):  # 4 splits a group across micro-batches
            model.zero_grad()
            grpo.accumulate_gradients(model, ids, mask, out, lengths, grpo.completion_mask(lengths, out.shape[1]), adv, old,
                                      ref, cfg, mb)  # fmt: skip
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert torch.allclose(grads[0], grads[1], atol=1e-6), loss_type
        assert torch.allclose(grads[0], grads[2], atol=1e-6), loss_type


# ----------------------------------------------------------------------------- the update against an independent reference
def plain_logprobs(model, prompt_ids, prompt_mask, completion_ids, index, temperature: float):
    """log pi(o_t | q, o_<t) (B, L) the plain way: each row's whole sequence through the model, its
    logits, log_softmax, gather. No shared prompt cache, no hidden-state hook, no chunked head."""
    full = torch.cat([prompt_ids[index], completion_ids], 1)  # (B, P + L)
    full_mask = torch.cat([prompt_mask[index], torch.ones_like(completion_ids)], 1)
    position = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=position).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature  # (B, L, V): P-1+t predicts token t
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)


def plain_objective(logp, old_logp, ref_logp, advantages, mask, cfg):
    """-J of the paper written out again (not grpo_loss), with the per-token k3 KL and the clipped
    tokens (those whose clipped term is the smaller one, so they get no gradient)."""
    eps, eps_high = cfg.clip_eps, (cfg.clip_eps_high if cfg.clip_eps_high >= 0 else cfg.clip_eps)
    A = advantages[:, None]  # (B, 1)
    ratio = (logp - old_logp).exp()
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps_high) * A)
    kl = (ref_logp - logp).exp() - (ref_logp - logp) - 1
    B = len(mask)
    normalizer = {"grpo": mask.sum(1, keepdim=True).clamp(min=1) * B, "dapo": mask.sum(),
                  "dr_grpo": B * cfg.max_new_tokens}[cfg.loss_type]  # fmt: skip
    clipped = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps) & (A < 0))
    return -((surrogate - cfg.beta * kl) * mask / normalizer).sum(), kl.detach(), clipped


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def assert_same_gradient(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 noise (the two paths sum in different orders): 1e-4 of the norm, far below
    what a dropped term changes (a KL of beta 0.1 over log-ratios of 0.3 moves it by a few percent)."""
    assert reference.norm() > 0
    assert (ours - reference).norm() <= 1e-4 * reference.norm(), ((ours - reference).norm(), reference.norm())


# every value away from its default, so that a setting the update ignored changes its gradient
REFERENCE_CFG = dict(beta=0.1, clip_eps=0.25, clip_eps_high=0.32, temperature=0.7, max_new_tokens=12)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_accumulated_gradient_equals_one_plain_backward(tiny_model, loss_type):
    """accumulate_gradients (shared prompt cache, chunked fp32 head, micro-batches of 3 that split a group,
    the NaN guard) gives the gradient of one plain backward of -J over the whole batch, with log-probs from
    full sequences. The batch has every case: ratios below 1 - eps, inside, between 1 + eps and 1 + eps_high
    (clipped only if eps_high is ignored) and above it; beta > 0 with a reference that differs; tokens the
    environment wrote. The logged kl, clip_frac and logp_mismatch are the masked means computed by hand. Both
    clip bounds are away from the default 0.2, with ratios between them and it (clipped only if one is ignored)."""
    model, tok = load(tiny_model)
    model.train()
    ids, pmask = prompts_of(tok, ["1+1?", "what is 12 + 30?", "9?"])
    G, L = 2, 9
    index = torch.arange(6) // G
    out = torch.randint(3, 90, (6, L), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 3, 6, 1, 8, 5])
    by_env = torch.zeros(6, L, dtype=torch.bool)
    by_env[0, 2:4] = by_env[4, 4:6] = True  # context written by the environment, not actions
    mask = ((torch.arange(L)[None] < lengths[:, None]) & ~by_env).float()  # by hand, not completion_mask
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5])
    # log-ratios cycling through every region of the clip: rho = 0.61, 0.78, 1, 1.11, 1.28, 1.65 with bounds 0.75, 1.32
    shifts = torch.tensor([-0.5, -0.25, 0.0, 0.1, 0.25, 0.5]).repeat(10)[: 6 * L].view(6, L)
    noise = 0.3 * torch.randn(6, L, generator=torch.Generator().manual_seed(1))
    model, ids, pmask, index, out, lengths, by_env, mask, adv, shifts, noise = to_device(
        model, ids, pmask, index, out, lengths, by_env, mask, adv, shifts, noise
    )
    with torch.no_grad():
        logp0 = plain_logprobs(model, ids, pmask, out, index, 0.7)
    old = logp0 - shifts
    ref = logp0 + noise
    cfg = grpo.Config(loss_type=loss_type, **REFERENCE_CFG)
    band = (shifts > math.log(1 + cfg.clip_eps)) & (shifts < math.log(1 + cfg.clip_eps_high)) & (adv[:, None] > 0)
    assert (band & mask.bool()).any()  # tokens that only clip-higher keeps in the gradient
    low = (shifts < math.log(1 - 0.2)) & (shifts > math.log(1 - cfg.clip_eps)) & (adv[:, None] < 0)
    assert (low & mask.bool()).any()  # tokens that the default clip_eps 0.2 would clip, and 0.25 does not

    model.zero_grad()
    stats = grpo.accumulate_gradients(model, ids, pmask, out, lengths, mask, adv, old, ref, cfg, 3)
    ours = flat_grad(model)
    model.zero_grad()
    logp = plain_logprobs(model, ids, pmask, out, index, 0.7)
    loss, kl, clipped = plain_objective(logp, old, ref, adv, mask, cfg)
    loss.backward()
    assert_same_gradient(ours, flat_grad(model))
    assert stats["loss"][0] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    tokens = mask.sum().item()
    assert (clipped & mask.bool()).any() and not (clipped & mask.bool()).all()  # the clip is really at work
    hand = {"kl": (kl * mask).sum(), "clip_frac": (clipped * mask).sum(), "logp_mismatch": (shifts.abs() * mask).sum()}
    for k, total in hand.items():
        assert stats[k][1] == tokens, k
        assert stats[k][0] / stats[k][1] == pytest.approx(total.item() / tokens, rel=1e-4, abs=1e-6), k


def moved_lora(model) -> None:
    """Rank-4 adapters on model whose B moved (no longer 0): the policy differs from its base, pi_ref."""
    grpo.add_lora(model, grpo.Config(lora_rank=4, lora_lr=1e-4), None)
    with torch.no_grad():
        for layer in grpo.lora_layers(model):
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_plain_update_equals_the_fast_one(tiny_model, loss_type, lora):
    """Given the same rollout, plain_update (one forward of the whole batch, grpo_loss, backward; --plain) and
    fast_update (accumulate_gradients in micro-batches of 3 that split a group; the default) leave the same
    gradient and log the same numbers, for every normalization (5), with and without LoRA, where each difference
    would show: tokens the environment wrote, a reference that differs, ratios beyond both clip bounds (asserted),
    and a max_grad_norm that clips (asserted: the gradient compared is the clipped one). A non-finite loss is
    skipped by both alike: nothing stepped, the gradients dropped. A fork that edits one must edit the other."""
    model, tok = load(tiny_model)
    if lora:
        moved_lora(model)
    model.train()
    ids, pmask = prompts_of(tok, ["1+1?", "what is 12 + 30?", "9?"])
    G, L = 2, 9
    out = torch.randint(3, 90, (6, L), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 3, 6, 1, 8, 5])
    by_env = torch.zeros(6, L, dtype=torch.bool)
    by_env[0, 2:4] = by_env[4, 4:6] = True
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.1, 0.21, 0.5]).repeat(10)[: 6 * L].view(6, L)
    noise = 0.3 * torch.randn(6, L, generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5])
    model, ids, pmask, out, lengths, by_env, shifts, noise, adv = to_device(
        model, ids, pmask, out, lengths, by_env, shifts, noise, adv
    )
    with torch.no_grad():
        logp0 = plain_logprobs(model, ids, pmask, out, torch.arange(6, device=DEVICE) // G, 0.7)
    ro = grpo.Rollout(ids, pmask, out, lengths, lengths < L, logp0 - shifts, by_env, [""] * 6)
    cfg = grpo.Config(loss_type=loss_type, micro_batch_size=3, max_grad_norm=0.05, **REFERENCE_CFG)
    mask = grpo.completion_mask(lengths, L, by_env)
    for bound, A in ((1 - cfg.clip_eps, adv < 0), (1 + cfg.clip_eps_high, adv > 0)):  # both clip bounds bite
        beyond = (shifts.exp() < bound) if bound < 1 else (shifts.exp() > bound)
        assert (beyond & A[:, None] & mask.bool()).any(), bound
    results = []
    for update in (grpo.plain_update, grpo.fast_update):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step moves nothing: the gradient stays
        stats, ok = update(model, optimizer, ro, mask, adv, logp0 + noise, cfg)
        results.append(([p.grad.flatten() for p in model.parameters() if p.grad is not None], stats, ok))
    (plain, plain_stats, plain_ok), (fast, fast_stats, fast_ok) = results
    assert plain_ok and fast_ok and sorted(plain_stats) == sorted(fast_stats)
    assert plain_stats["grad_norm"][0] > 2 * cfg.max_grad_norm  # the clip is at work
    assert_same_gradient(torch.cat(fast), torch.cat(plain))
    for k, (total, count) in plain_stats.items():
        assert count == fast_stats[k][1] and total == pytest.approx(fast_stats[k][0], rel=1e-4, abs=1e-6), k
    adv[0] = float("nan")  # a non-finite loss: no step, on either path
    for update in (grpo.plain_update, grpo.fast_update):
        before = [p.detach().clone() for p in model.parameters()]
        stats, ok = update(model, torch.optim.SGD(model.parameters(), lr=1.0), ro, mask, adv, logp0 + noise, cfg)
        assert not ok and all(p.grad is None for p in model.parameters()), update.__name__
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), update.__name__


def test_plain_reference_logprobs_equal_the_fast_ones(tiny_model, monkeypatch):
    """pi_ref's log-probs, plainly (sequence_logprobs, adapters off) and fast (frozen_logprobs: micro-batches of
    --micro_batch_size 4 that split a group, each trimmed to its longest completion: 4 and 2 rows, counted), with
    LoRA adapters that moved: equal on every completion token, and both those of the base model."""
    model, tok = load(tiny_model)
    ids, pmask = prompts_of(tok, ["1+1?", "what is 12 + 30?", "9?"])
    out = torch.randint(3, 90, (6, 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 3, 6, 1, 8, 5])
    model, ids, pmask, out, lengths = to_device(model, ids, pmask, out, lengths)
    no_env = torch.zeros(6, 9, dtype=torch.bool, device=DEVICE)
    ro = grpo.Rollout(ids, pmask, out, lengths, lengths < 9, torch.zeros(6, 9, device=DEVICE), no_env, [])
    with torch.no_grad():
        base = grpo.sequence_logprobs(model, ids, pmask, out, 0.7)
    moved_lora(model)
    cfg = grpo.Config(micro_batch_size=4, temperature=0.7, precision="fp32")
    rows, token_logprobs = [], grpo.token_logprobs
    monkeypatch.setattr(grpo, "token_logprobs", lambda m, p, pm, c, *a: rows.append(c.shape) or token_logprobs(m, p, pm, c, *a))  # fmt: skip
    plain, fast = grpo.plain_reference_logprobs(model, ro, cfg), grpo.fast_reference_logprobs(model, ro, cfg)
    assert rows == [(4, 9), (2, 8)]  # --micro_batch_size rows at a time, each trimmed to its longest completion
    m = grpo.completion_mask(lengths, 9).bool()
    assert torch.allclose(plain[m], fast[m], atol=1e-5) and torch.allclose(plain[m], base[m], atol=1e-5)


def test_the_switch_picks_the_plain_forms_for_plain():
    """--plain trains through the forms a first reading reads; the default through their fast forms."""
    assert grpo.paths(grpo.Config(plain=True)) == (
        grpo.sample_plainly,
        grpo.plain_reference_logprobs,
        grpo.plain_update,
    )
    assert grpo.paths(grpo.Config()) == (grpo.rollout, grpo.fast_reference_logprobs, grpo.fast_update)


def assert_same_metrics(fast: grpo.Config, plain: grpo.Config) -> list[dict]:
    """The two runs' metrics.jsonl: the same records and keys, every value equal up to float noise (1e-3 relative;
    token counts, rewards and accuracies exactly, since the tokens are), timings aside. Returns plain's records."""
    fast_records, plain_records = read_metrics(fast), read_metrics(plain)
    assert [r["step"] for r in plain_records] == [r["step"] for r in fast_records] == list(range(plain.steps + 1))
    for f, p in zip(fast_records, plain_records):
        assert sorted(f) == sorted(p)
        for k in f:
            if k not in ("step_time", "tokens_per_s"):
                assert p[k] == pytest.approx(f[k], rel=1e-3, abs=1e-5), (f["step"], k)
    return plain_records


def test_plain_mode_trains_lora_as_the_default_does(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--plain with LoRA (pi_ref: the policy with its adapters off; the policy samples through its plain forward,
    not rollout's casts) gives the default run's metrics from the same seed, evaluation included, and moves the
    adapters. --plain refuses bf16 in one line (its log-probs come from the model's own head, which bf16 rounds)."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(shorter_is_better, 1.0)])
    common = dict(lora_rank=4, steps=2, eval_size=2, micro_batch_size=3, device=str(DEVICE))
    moved = []
    fast, plain = (
        tiny_config(tiny_model, tiny_data, tmp_path / n, plain=n == "plain", **common) for n in ("fast", "plain")
    )
    grpo.main(fast)
    monkeypatch.setattr(grpo, "sampling_adapters", None)  # the fast form's casts: not called under --plain
    grpo.main(plain, on_step=lambda step, model, *_: moved.append(grpo.lora_layers(model)[0].lora_B.abs().sum().item()))
    assert_same_metrics(fast, plain)
    assert min(moved) > 0
    with pytest.raises(SystemExit, match="^error: --plain computes in fp32 .* drop --precision bf16, or drop --plain$"):
        grpo.check_config(dataclasses.replace(plain, precision="bf16"))


def test_plain_refuses_torchrun_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--plain trains in one process"):
        grpo.check_config(grpo.Config(plain=True))


def test_plain_mode_trains_evaluates_and_saves_through_the_plain_forms(tiny_model, tiny_data, tmp_path, monkeypatch):
    """python grpo.py --plain: training and evaluation run the plain forms above the END line, never a fast one
    (each is replaced by a function that fails), with tools, mu = 2 and a reference; the run saves final/. The same
    seed without --plain gives the same metrics: the samplers draw the same tokens from the same noise, and the
    updates the same gradient up to float noise (loss, KL and gradient norm within 1e-3 relative; token counts,
    rewards and accuracies equal, since the tokens are). Between them the two runs call every function defined
    above the END line: what a first reading reads runs, in one mode or the other."""
    with open(grpo.__file__) as f:
        end = next(i + 1 for i, line in enumerate(f) if line.startswith("# ===") and "END OF THE ALGORITHM" in line)
    first_reading = {name: fn for name, fn in vars(grpo).items()
                     if inspect.isfunction(fn) and fn.__module__ == "grpo" and inspect.unwrap(fn).__code__.co_firstlineno < end}  # fmt: skip
    called = set()

    def spy(fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            called.add(fn.__name__)
            return fn(*args, **kwargs)

        return recorded

    for name, fn in first_reading.items():
        monkeypatch.setattr(grpo, name, spy(fn))
    rewards = [(spy(fn), weight) for fn, weight in grpo.REWARD_FUNCS]  # the table holds the functions themselves
    monkeypatch.setattr(grpo, "REWARD_FUNCS", rewards + [(shorter_is_better, 1.0)])
    monkeypatch.setattr(grpo, "tool_env", frequent_env)
    common = dict(steps=2, eval_size=2, mu=2, beta=0.04, tools="calculator", micro_batch_size=3, device=str(DEVICE))
    fast = tiny_config(tiny_model, tiny_data, tmp_path / "fast", **common)
    grpo.main(fast)

    def fails(*args, **kwargs):
        raise AssertionError("a fast path ran under --plain")

    for name in ("rollout", "token_logprobs", "frozen_logprobs", "accumulate_gradients", "sampling_adapters"):
        monkeypatch.setattr(grpo, name, fails)
    plain = tiny_config(tiny_model, tiny_data, tmp_path / "plain", plain=True, **common)
    grpo.main(plain)
    assert os.path.isfile(os.path.join(plain.output_dir, "final", "config.json"))
    assert assert_same_metrics(fast, plain)[1]["tool_calls"] > 0
    assert len(first_reading) > 15 and set(first_reading) <= called, set(first_reading) - called


class RecordingSGD:
    """Stands in for AdamW in grpo_step: at each step() it keeps the weights the pass started from and the
    gradient it produced, then moves the weights by plain SGD (so a second pass sees a changed policy)."""

    def __init__(self, model, lr: float):
        self.params, self.lr, self.passes = list(model.parameters()), lr, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.passes.append(
            ([p.detach().clone() for p in self.params], torch.cat([p.grad.flatten() for p in self.params]))
        )
        with torch.no_grad():
            for p in self.params:
                p -= self.lr * p.grad


def test_grpo_step_update_equals_one_plain_backward_per_pass(tiny_model, monkeypatch):
    """grpo_step with mu = 2, tools (environment tokens from a frequent stand-in calculator), a reference
    model that differs, beta > 0 and clip_eps_high: each pass's gradient equals one plain backward of -J
    over the whole batch, with pi_old = the rollout's own log-probs, pi_ref's log-probs from full
    sequences and the paper's advantages from the returned rewards (written again here: a fork that changes the
    baseline or the KL estimator changes them here too; the normalizations are each held to the plain form in
    test_accumulated_gradient_equals_one_plain_backward). The second pass starts from moved weights, so
    its ratios leave 1 and some tokens are clipped; the summed metrics are the passes' masked sums."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    monkeypatch.setattr(grpo, "tool_env", frequent_env)
    rollouts, generate = [], grpo.generate
    monkeypatch.setattr(grpo, "generate", lambda *a: rollouts.append(generate(*a)) or rollouts[-1])
    model, tok = load(tiny_model)
    ref_model = load(tiny_model)[0].requires_grad_(False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model, ref_model = to_device(model, ref_model)
    cfg = grpo.Config(mu=2, group_size=4, micro_batch_size=3, tools="calculator",
                      max_grad_norm=1e9, precision="fp32", **REFERENCE_CFG)  # fmt: skip
    rows = [{"question": "1+1?", "gold": "2"}, {"question": "what is 12 + 30?", "gold": "42"}]
    optimizer = RecordingSGD(model, lr=0.5)
    torch.manual_seed(1)
    sums, applied, _, rewards = grpo.grpo_step(model, model, ref_model, tok, optimizer, rows, cfg)
    assert applied == [True, True] and len(optimizer.passes) == 2
    ro = rollouts[0]
    ids, pmask, out, lengths, sample_logp, by_env = (
        ro.prompt_ids,
        ro.prompt_mask,
        ro.completion_ids,
        ro.lengths,
        ro.sample_logp,
        ro.by_env,
    )
    B, L = out.shape
    index, position = torch.arange(B, device=DEVICE) // cfg.group_size, torch.arange(L, device=DEVICE)[None]
    mask = ((position < lengths[:, None]) & ~by_env).float()
    assert (by_env & (position < lengths[:, None])).any()  # environment tokens inside completions
    r = rewards.view(-1, cfg.group_size)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten().to(DEVICE)
    assert (adv != 0).any()  # a signal, so the surrogate has a gradient
    with torch.no_grad():
        ref_logp = plain_logprobs(ref_model, ids, pmask, out, index, cfg.temperature)
    check, clip_counts, kl_sums = load(tiny_model)[0].to(DEVICE).train(), [], []
    for i, (weights, grad) in enumerate(optimizer.passes):
        with torch.no_grad():
            for p, w in zip(check.parameters(), weights):
                p.copy_(w)
        check.zero_grad()
        logp = plain_logprobs(check, ids, pmask, out, index, cfg.temperature)
        loss, kl, clipped = plain_objective(logp, sample_logp, ref_logp, adv, mask, cfg)
        loss.backward()
        assert_same_gradient(grad, flat_grad(check))
        clip_counts.append((clipped * mask).sum().item())
        kl_sums.append((kl * mask).sum().item())
        if i == 0:
            mismatch = ((sample_logp - logp.detach()).abs() * mask).sum().item()
    # fp32: rho = 1 at the first pass; the second starts from moved weights
    assert clip_counts[0] == 0 and clip_counts[1] > 0, clip_counts
    tokens = mask.sum().item()
    assert sums["clip_frac"] == pytest.approx([sum(clip_counts), 2 * tokens])
    assert sums["kl"] == pytest.approx([sum(kl_sums), 2 * tokens], rel=1e-4)
    assert sums["logp_mismatch"][1] == tokens and sums["logp_mismatch"][0] == pytest.approx(mismatch, abs=1e-4)
    assert mismatch / tokens < 1e-5  # sampled at the loss's temperature (0.7): pi_old is pi_theta, up to fp32 rounding
    norms = [g.norm().item() for _, g in optimizer.passes]
    assert sums["grad_norm"] == pytest.approx([sum(norms), 2], rel=1e-5)
    assert sums["frac_zero_std"] == [float((r.std(1) == 0).sum()), len(rows)]  # counted over groups of G


def test_a_non_finite_old_logprob_where_the_model_did_not_sample_leaves_the_update_finite(tiny_model):
    """The rollout's log-prob of a token the model did not sample (past the end, or written by the
    environment) is not a log pi_old: it may be anything. Where it is -inf or -1e30 (exp of its negative
    overflows) the loss and gradient stay finite and equal those with a sane value there."""
    model, tok = load(tiny_model)
    model.train()
    ids, pmask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    out = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 2, 4, 3])
    by_env = torch.zeros(4, 6, dtype=torch.bool)
    by_env[0, 1] = True
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5])  # both signs: with A < 0, min() picks rho * A = -inf
    with torch.no_grad():
        logp = grpo.token_logprobs(model, ids, pmask, out, torch.arange(4) // 2, 1.0)
    unsampled = ~grpo.completion_mask(lengths, 6, by_env).bool()
    results = []
    for bad in (None, -math.inf, -1e30):
        old = logp + 0.1 if bad is None else torch.where(unsampled, bad, logp + 0.1)
        model.zero_grad()
        stats = grpo.accumulate_gradients(model, ids, pmask, out, lengths, (~unsampled).float(), adv, old, logp - 0.1,
                                          grpo.Config(beta=0.04, max_new_tokens=6), 2)  # fmt: skip
        results.append((stats["loss"][0], flat_grad(model)))
        assert math.isfinite(stats["loss"][0]) and torch.isfinite(results[-1][1]).all(), bad
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-7) and torch.allclose(grad, results[0][1], atol=1e-7)


# ----------------------------------------------------------------------------- the bf16 (CUDA) path, on CPU
def prompts_of(tok, questions):
    return grpo.tokenize_prompts(tok, [grpo.build_prompt(tok, q) for q in questions], "cpu")


def test_bf16_copy_keeps_buffers_fp32_and_refresh_copies_weights(tiny_qwen):
    model, tok = load(tiny_qwen)
    sampler = grpo.bf16_copy(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in sampler.parameters())
    assert sampler.model.rotary_emb.inv_freq.dtype == torch.float32  # rotary angles stay exact
    assert torch.equal(sampler.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert sampler.lm_head.weight is sampler.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not torch.equal(sampler.model.norm.weight, model.model.norm.weight.bfloat16())
    grpo.refresh_sampler(sampler, model)
    for s, p in zip(sampler.parameters(), model.parameters()):
        assert s.dtype == torch.bfloat16 and torch.equal(s, p.bfloat16())


def test_sample_logp_is_the_policy_logp_of_the_sampled_tokens(tiny_qwen):
    """The rollout's own log-prob of each sampled token equals a full recompute (fp32): the
    train/sample mismatch metric then measures only what the bf16 sampler changes."""
    model, tok = load(tiny_qwen)
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    torch.manual_seed(0)
    out, lengths, _, sample_logp, _ = grpo.rollout(
        model, ids, mask, 3, 10, 0.7, grpo.eos_ids(model, tok), tok.pad_token_id
    )
    with torch.no_grad():
        logp = grpo.token_logprobs(model, ids, mask, out, torch.arange(6) // 3, 0.7)
    m = grpo.completion_mask(lengths, out.shape[1]).bool()
    assert torch.allclose(sample_logp[m], logp[m], atol=1e-4)


def count_host_syncs(fn) -> int:
    """Calls that copy a GPU value to the host (.item(), bool(tensor), nonzero): each one stalls a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in prof.events())


def test_decode_loop_has_no_per_token_host_sync(tiny_qwen):
    model, tok = load(tiny_qwen)
    sampler = grpo.bf16_copy(model)
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    never = [len(tok) + 5]  # an EOS id that never comes: every completion runs K tokens
    syncs = {}
    for K in (16, 64):

        def run(K=K):
            return grpo.rollout(sampler, ids, mask, 4, K, 1.0, never, tok.pad_token_id)

        run()  # warm up
        syncs[K] = count_host_syncs(run)
        assert syncs[K] <= K / 8 + 4, syncs  # the "all ended?" check every 8 tokens plus a constant
    assert syncs[64] - syncs[16] == 48 / 8, syncs  # exactly one per 8 decode steps


@pytest.mark.parametrize("which", ["tiny_model", "tiny_qwen"])
def test_main_bf16_end_to_end(which, request, tiny_data, tmp_path, monkeypatch):
    """What a GPU runs (bf16 compute over fp32 weights, bf16 sampler and reference), run on CPU, with a
    reward that varies within groups: every step has a gradient, after every step the sampler holds the
    policy's new weights cast to bf16, and the next rollout's log-probs are those of the updated policy."""
    path = request.getfixturevalue(which)
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    copies, bf16_copy = [], grpo.bf16_copy
    monkeypatch.setattr(grpo, "bf16_copy", lambda model: copies.append(bf16_copy(model)) or copies[-1])
    synced = []

    def on_step(step, model, metrics, sums):
        sampler = copies[0]  # main makes the sampler first, then the bf16 reference
        synced.append(
            all(torch.equal(s, p.detach().bfloat16()) for s, p in zip(sampler.parameters(), model.parameters()))
        )

    cfg = tiny_config(path, tiny_data, tmp_path, precision="bf16", eval_every=1)
    grpo.main(cfg, on_step=on_step)
    records = read_metrics(cfg)
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(math.isfinite(v) for v in r.values()), r
        assert 0 <= r["logp_mismatch"] < 1.0  # bf16 sampler vs bf16-autocast policy: small, logged
    assert sum("eval/accuracy_strict" in r for r in records) == 3  # before, at step 1, after
    final, _ = load(os.path.join(cfg.output_dir, "final"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in final.parameters())  # fp32 master
    trained = zip(params_of(os.path.join(cfg.output_dir, "final")), params_of(path))
    assert any(not torch.equal(a, b) for a, b in trained)  # the updates reached the saved weights
    assert synced == [True, True] and all(r["grad_norm"] > 0 and r["frac_zero_std"] < 1 for r in train)
    # Step 2 samples after an update. The sampler is then the updated policy in bf16, and what is left of the
    # mean |log rho| is bf16's rounding (8 significant bits: 2^-9 = 0.002 relative, per weight and activation):
    # measured 7e-4 on both models, at step 1 and at step 2. A sampler left at the initial weights misses the
    # update, which moved these log-probs by 0.09 to 0.1, 30 times the bound.
    assert train[1]["logp_mismatch"] < 3e-3, train[1]["logp_mismatch"]


def test_fp32_head_logprobs_and_gradients_equal_the_plain_computation(tiny_qwen):
    """token_logprobs never makes (B, L, V) logits, yet its values and gradients (the tied head and
    embedding included) equal log_softmax of the model's own logits, in fp32."""
    model, tok = load(tiny_qwen)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    model.train()
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    completion = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 0, 1, 1])
    weights = torch.linspace(-1, 1, completion.numel()).view(completion.shape)
    model, ids, mask, completion, index, weights = to_device(model, ids, mask, completion, index, weights)
    ours = grpo.token_logprobs(model, ids, mask, completion, index, 0.8, chunk=5)
    (ours * weights).sum().backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = torch.cat([ids[index], completion], 1)
    full_mask = torch.cat([mask[index], torch.ones_like(completion)], 1)
    position = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=position).logits[:, ids.shape[1] - 1 : -1]
    plain = (logits.float() / 0.8).log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    (plain * weights).sum().backward()
    assert torch.allclose(ours, plain, atol=1e-5)
    for a, p in zip(ours_grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_lm_head_is_fp32_under_bf16_autocast(tiny_qwen):
    """Logits between 16 and 32 are 0.125 apart in bf16. Under autocast the log-probs must match an fp32
    head on the same hidden states within a tolerance that a bf16 head (the model's own logits) misses."""
    model, tok = load(tiny_qwen)
    with torch.no_grad():
        model.model.norm.weight.fill_(40.0)  # large hidden states: logits in the tens
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    completion = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 0, 1, 1])
    full = torch.cat([ids[index], completion], 1)
    full_mask = torch.cat([mask[index], torch.ones_like(completion)], 1)
    position = (full_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=full, attention_mask=full_mask, position_ids=position)
    with torch.no_grad(), grpo.autocast(torch.device("cpu"), True):
        ours = grpo.token_logprobs(model, ids, mask, completion, index, 1.0)
        hidden = grpo.final_hidden(model, model, **inputs)[:, ids.shape[1] - 1 : -1]  # the same bf16-autocast body
        bf16_logits = model(**inputs).logits[:, ids.shape[1] - 1 : -1]  # what a plain forward gives
    assert bf16_logits.dtype == torch.bfloat16 and bf16_logits.abs().amax() > 16
    exact_logits = hidden.double() @ model.lm_head.weight.double().T
    exact = exact_logits.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    bf16_head = bf16_logits.double().log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    assert (ours.double() - exact).abs().max() < 1e-3
    assert (bf16_head - exact).abs().max() > 2e-2  # what the fp32 head removes


def sampled_batch(model, tok, sampler, G=4, L=10):
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    torch.manual_seed(0)
    out, lengths, _, sample_logp, by_env = grpo.rollout(
        sampler, ids, mask, G, L, 1.0, grpo.eos_ids(model, tok), tok.pad_token_id
    )
    return ids, mask, out, lengths, by_env, sample_logp


def grads_with(model, batch, old_logp, cfg, adv):
    ids, mask, out, lengths, by_env, _ = batch
    model.zero_grad()
    own = grpo.completion_mask(lengths, out.shape[1], by_env)
    stats = grpo.accumulate_gradients(model, ids, mask, out, lengths, own, adv, old_logp, None, cfg, 4)
    return stats, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_pi_old_is_the_sampler_and_in_fp32_the_step_is_unchanged(tiny_qwen):
    """In fp32 the sampler is the policy: rho = pi_theta / pi_sampler is 1 up to float noise, and the
    gradient equals the one with pi_old = pi_theta exactly (rho = 1)."""
    model, tok = load(tiny_qwen)
    model.train()
    batch = sampled_batch(model, tok, model)
    ids, mask, out, lengths, by_env, sample_logp = batch
    with torch.no_grad():
        logp = grpo.token_logprobs(model, ids, mask, out, torch.arange(8) // 4, 1.0)
    cfg, adv = grpo.Config(beta=0.0, max_new_tokens=10), torch.randn(8, generator=torch.Generator().manual_seed(2))
    stats, sampled = grads_with(model, batch, sample_logp, cfg, adv)
    _, exact = grads_with(model, batch, logp, cfg, adv)
    assert stats["logp_mismatch"][0] / stats["logp_mismatch"][1] < 1e-5 and stats["clip_frac"][0] == 0
    assert torch.allclose(sampled, exact, rtol=1e-4, atol=1e-6)


def test_a_sampler_that_differs_is_clipped_and_the_update_bounded(tiny_qwen):
    """A sampler with perturbed weights: tokens it made likely are off-policy for pi_theta. The clip
    catches them (clip_frac > 0), and the update stays finite and smaller than with unclipped ratios."""
    model, tok = load(tiny_qwen)
    model.train()
    sampler = grpo.bf16_copy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(3 * p.float().std() * torch.randn(p.shape).bfloat16())
    batch = sampled_batch(model, tok, sampler)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.2, -0.2])
    stats, clipped = grads_with(model, batch, batch[5], grpo.Config(beta=0.0, max_new_tokens=10), adv)
    _, unclipped = grads_with(model, batch, batch[5], grpo.Config(beta=0.0, max_new_tokens=10, clip_eps=1e9), adv)
    assert stats["clip_frac"][0] / stats["clip_frac"][1] > 0.05
    assert stats["logp_mismatch"][0] / stats["logp_mismatch"][1] > 0.1
    assert torch.isfinite(clipped).all() and clipped.norm() < unclipped.norm()


def test_a_forward_that_ignores_the_cache_stops_the_run(tiny_qwen, monkeypatch):
    """If transformers renames `cache` again, a model's forward takes the old name silently and the
    cache stays empty: the rollout and the log-probs must stop with one line, not train on garbage."""
    model, tok = load(tiny_qwen)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, cache=None, **kw: forward(*a, **kw))  # drops the cache
    ids, mask = prompts_of(tok, ["1+1?"])
    with pytest.raises(SystemExit, match="did not fill its KV cache"):
        grpo.rollout(model, ids, mask, 2, 4, 1.0, grpo.eos_ids(model, tok), tok.pad_token_id)
    with pytest.raises(SystemExit, match="did not fill its KV cache"):
        grpo.token_logprobs(model, ids, mask, torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0)


def test_transformers_deprecations_fail_the_tests():
    """transformers warns of a renamed keyword with a FutureWarning attributed to the caller's module;
    pyproject.toml turns those into errors, so the next rename fails CI instead of users' runs."""
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("past_key_values", "99.0.0", new_name="cache")
    def forward(cache=None):
        return cache

    with pytest.raises(FutureWarning, match="deprecated"):
        forward(past_key_values=1)


def test_out_of_memory_stops_with_the_flags_that_help(tiny_model, tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=3, save_every=1, eval_size=0)

    def step(*args, calls=[]):  # noqa: B006
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args)

    real_step = grpo.grpo_step
    monkeypatch.setattr(grpo, "grpo_step", step)
    with pytest.raises(SystemExit) as e:
        grpo.main(cfg)
    message = str(e.value)
    assert "\n" not in message and "out of GPU memory at step 2" in message
    assert all(flag in message for flag in ("--micro_batch_size", "--gradient_checkpointing", "--max_new_tokens"))
    grpo.main(dataclasses_replace(cfg, resume=True))  # the step-1 checkpoint is intact
    assert [r["step"] for r in read_metrics(cfg)] == [1, 2, 3]


def test_checkpoint_saved_on_gpu_resumes_on_cpu(tiny_model, tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, save_every=1, eval_size=0)
    grpo.main(cfg)
    state_path = os.path.join(cfg.output_dir, "checkpoint", "trainer_state.pt")
    state = torch.load(state_path, weights_only=False)
    # write it again with every tensor tagged as stored on cuda:0, as a GPU run writes it
    gpu_tag = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda obj, location: None)
    monkeypatch.setattr(torch.serialization, "_package_registry", [gpu_tag, *torch.serialization._package_registry])
    torch.save(state, state_path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(state_path, weights_only=False)  # it really is a GPU checkpoint now
    os.remove(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    grpo.main(dataclasses_replace(cfg, resume=True, steps=3))  # mapped onto this run's device
    assert [r["step"] for r in read_metrics(cfg)] == [1, 2, 3]
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "model.safetensors"))


# ----------------------------------------------------------------------------- tools: environment tokens
def script_hook(model, tok, prompt_mask, scripts, bias=None):
    """Make the tiny model write scripts[b] (a list of token ids) as completion b: at every position
    the next script token gets +bias (None: every other token is ruled out). G must be 1."""
    prompt_len = prompt_mask.sum(1)  # (n,) real prompt lengths: completion token i sits at position p + i

    def hook(module, args, kwargs, output):
        logits = output.logits  # (n, q, V): q may be fewer positions than the input's (logits_to_keep)
        position = kwargs["position_ids"][:, -logits.shape[1] :]  # (n, q)
        for b in range(logits.shape[0]):
            for j in range(logits.shape[1]):
                i = int(position[b, j] - prompt_len[b] + 1)  # the completion index this position predicts
                if 0 <= i < len(scripts[b]):
                    if bias is None:
                        logits[b, j] = -1e4
                        logits[b, j, scripts[b][i]] = 1e4
                    else:
                        logits[b, j, scripts[b][i]] += bias
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


TOOL_SCRIPTS = [  # what each row's model writes; '#' runs stand where the environment's reply goes
    ("<calc>2+3</calc>", "<result>5</result>", "ok"),
    ("ab<calc>7*6</calc>", "<result>42</result>", "done"),
    ("notoolshere", "", ""),
    (
        "<calc>1+1</calc>",
        "<result>2</result>",
        "<calc>2+2</calc>",
        "<result>4</result>",
        "<calc>3+3</calc>",
        "<result>error: no calls left, at most 2</result>",
        "!",
    ),  # fmt: skip
]


def scripted_tool_rollout(model, tok, rows, bias=None, temperature=0.0):
    ids, mask = prompts_of(tok, [f"q{r}" for r in rows])
    wanted = ["".join(TOOL_SCRIPTS[r]) for r in rows]  # what the completion must be, replies included
    scripted = [
        "".join(part if k % 2 == 0 else "#" * len(ids_of(tok, part)) for k, part in enumerate(TOOL_SCRIPTS[r]))
        for r in rows
    ]
    hook = script_hook(model, tok, mask, [ids_of(tok, s) + [tok.eos_token_id] for s in scripted], bias)
    env = grpo.tool_env(tok, max_calls=2)
    try:
        out = grpo.rollout(model, ids, mask, 1, 160, temperature, [tok.eos_token_id], tok.pad_token_id, env=env)
    finally:
        hook.remove()
    return ids, mask, wanted, out


def test_tool_env_reads_a_close_tag_merged_with_the_next_character():
    """In many vocabularies '><' is one token, so a model closes a call with '</calc' + '><': the call
    is still answered, and the environment writes only the rest of '<result>...</result>'."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {t: i for i, t in enumerate(["<|unk|>", "<|im_end|>", *chars, "><"])}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[(">", "<")], unk_token="<|unk|>"))
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", unk_token="<|unk|>")
    env = grpo.tool_env(tok, max_calls=2)
    ids = ids_of(tok, "so <calc>2+3</calc><")
    assert tok.convert_ids_to_tokens(ids[-1:]) == ["><"]  # the tag ends inside the last token
    assert tok.decode(env(ids, 0)) == "result>5</result>"
    assert tok.decode(env(ids_of(tok, "so <calc>2+3</calc>"), 0)) == "<result>5</result>"
    assert tok.decode(env(ids, 2)) == "result>error: no calls left, at most 2</result>"  # the cap
    for text in ["so <calc>2+3</calc><result>5</result><", "2+3</calc><", "<calc>2+3</calc><x", "<calc>2+3"]:
        assert env(ids_of(tok, text), 0) is None, text  # no call closed by the last token


def kilometres_to_metres(text: str) -> str:
    """A toy tool, text in, text out: '3 km' -> '3000'; anything else is an error, never an exception."""
    number, _, unit = text.strip().partition(" ")
    if unit != "km" or not number.isdigit() or len(number) > 12:
        return "error: write a whole number of km, like 3 km"
    return str(int(number) * 1000)


def test_a_registered_tool_runs_in_the_environment_and_is_paid_by_its_own_rule(tiny_model, monkeypatch):
    """A tool is a function and one entry of TOOLS: with only that, --tools names it, the prompt teaches it, the
    environment answers its calls inside a rollout's decode steps (environment_turn), and the tool rewards parse,
    re-check and pay its calls by its rule: this one-argument tool names none, so an input read from the question
    earns every rung (grounded_input), while a typed result or an invented input pays nothing."""
    entry = {"tag": "km", "run": kilometres_to_metres, "prompt": "Convert with <km>3 km</km>.", "example": ("q", "a")}
    monkeypatch.setitem(grpo.TOOLS, "units", entry)
    grpo.check_config(grpo.Config(tools="calculator,units"))
    tok = load(tiny_model)[1]
    assert "Convert with <km>3 km</km>." in grpo.build_prompt(tok, "q", tools="units")
    env = grpo.tool_env(tok, 2, "units")
    model_ids, turns = ids_of(tok, "so <km>3 km</km>"), {"ids": [[]], "queue": [[]], "calls": [0], "eos": {0}}
    written, by_env = [], []
    for token in model_ids + [tok.pad_token_id] * 30:  # the model's tokens, then whatever it would sample
        chosen, forced = grpo.environment_turn(env, torch.tensor([token]), torch.tensor([False]), turns)
        written.append(chosen.item())
        by_env.append(forced.item())
    replied = [i for i, forced in zip(written, by_env) if forced]
    assert tok.decode(replied) == "<result>3000</result>" and turns["calls"] == [1]
    question = "How many metres is a 3 km walk?"
    honest = "<km>3 km</km><result>3000</result> <answer>3000</answer>"
    assert grpo.answered_calls(honest) == [("km", "3 km", "3000", True)]
    assert [fn(honest, "3000", question=question) for fn, _ in grpo.TOOL_REWARD_FUNCS] == [1, 1, 1, 1]
    typed, invented = "<km>3 km</km><result>3001</result> <answer>3001</answer>", "<km>7 km</km><result>7000</result>"
    assert grpo.tool_reward(typed, "3001", question=question) == 0.0  # a result the tool did not return
    paid = [fn(invented + " <answer>7000</answer>", "7000", question=question) for fn, _ in grpo.TOOL_REWARD_FUNCS]
    assert paid == [0, 0, 0, 1]  # 7 km is not asked: only the first rung, a call that works
    with pytest.raises(SystemExit, match="unknown --tools 'abacus'"):
        grpo.check_config(grpo.Config(tools="units,abacus"))


LOCKERS = {"locker 7": "umbrella", "umbrella": "12", "locker 9": "kettle", "kettle": "30"}  # a small table


def find_in_table(key: str) -> str:
    """A toy text tool: the value of a key in a small table (text or a number); an unknown key is an error."""
    return LOCKERS.get(key.strip(), "error: no such key")


def test_a_text_tool_runs_in_the_environment_and_is_paid_by_its_own_rule(tiny_model, monkeypatch):
    """A lookup over a small table, registered with no rule of its own (grounded_input: a key read from the question
    or an earlier result is grounded work): the environment answers it with text, the prompt shows its example and
    the calculator's, and the rewards pay a two-step chain every rung, a guessed key only the first, never raising
    on a text result. Through score, with every reward of a --tools run, the chain pays the most."""
    example = ("What is in locker 1?", "<find>locker 1</find><result>pen</result> <answer>pen</answer>")
    entry = {"tag": "find", "run": find_in_table, "prompt": "Look up with <find>KEY</find>.", "example": example}
    monkeypatch.setitem(grpo.TOOLS, "table", entry)
    tok = load(tiny_model)[1]
    prompt = grpo.build_prompt(tok, "q", tools="calculator,table")
    assert grpo.TOOLS["calculator"]["example"][1] in prompt and example[1] in prompt  # each offered tool's example
    env, turns = grpo.tool_env(tok, 2, "calculator,table"), {"ids": [[]], "queue": [[]], "calls": [0], "eos": {0}}
    written = []
    for token in ids_of(tok, "so <find>locker 7</find>") + [tok.pad_token_id] * 30:
        chosen, forced = grpo.environment_turn(env, torch.tensor([token]), torch.tensor([False]), turns)
        written += [chosen.item()] if forced.item() else []
    assert tok.decode(written) == "<result>umbrella</result>"
    question = "What does the item in locker 7 cost?"
    chain = formatted("<find>locker 7</find><result>umbrella</result> <find>umbrella</find><result>12</result>", "12")
    rows = {  # what each of TOOL_REWARD_FUNCS pays (tool_reward, grounded_call, answer_from_call, well_formed)
        chain: [1, 1, 1, 1],
        formatted("<find>umbrella</find><result>12</result>", "12"): [0, 0, 0, 1],  # a guessed key
        formatted("<find>locker 7</find><result>12</result>", "12"): [0, 0, 0, 0],  # a typed result
        formatted("<find>locker 7</find><result>umbrella</result>", "umbrella"): [0, 1, 0, 1],  # a text answer
        formatted("<find>locker 9</find><result>kettle</result> <find>kettle</find><result>30</result>", "30"):
            [0, 0, 0, 1],  # locker 9 is not asked about
        formatted("<find>locker 7</find><result>umbrella</result>", "12"): [0, 1, 0, 1],  # half a chain, a guess
    }  # fmt: skip
    for completion, expected in rows.items():
        assert [fn(completion, "12", question=question) for fn, _ in grpo.TOOL_REWARD_FUNCS] == expected, completion
    funcs = grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS
    totals, _ = grpo.score(list(rows), [{"question": question, "gold": "12"}] * len(rows), funcs, [50] * 6, 400)
    assert totals.argmax().item() == 0 and (totals[1:] < totals[0]).all()


RESULTS = ["Paris", "12", "-0", "1e+20", "nan", "inf", "error: no such key", "not found", "", "  ", "1, 2 and 3",
           "x" * 100_000, "9" * 100_000, "<answer>" * 10_000, "1 + " * 25_000, "\u2212" * 100_000] + ADVERSARIAL  # fmt: skip


@pytest.mark.parametrize("fn", [f for f, _ in grpo.TOOL_REWARD_FUNCS])
def test_every_tool_reward_takes_any_result_text(fn, monkeypatch):
    """Rewards never raise, whatever a tool returns: each tool reward, with each tool's rule (the calculator's, and the
    default a lookup uses), on completions whose calls a tool answered with text, numbers, errors or 100,000
    characters of junk, chained and answered, returns a finite float, fast."""
    for text in RESULTS:
        if grpo.TOOL_RESULT[1] in text:
            continue
        for name in list(grpo.TOOLS):  # each tool's own rule, its function returning the junk
            monkeypatch.setitem(grpo.TOOLS, name, {**grpo.TOOLS[name], "run": lambda _, text=text: text})
        monkeypatch.setitem(grpo.TOOLS, "echo", {"tag": "echo", "run": lambda _, text=text: text})
        calls = f"<calc>2 * 3</calc><result>{text}</result> <echo>2 apples</echo><result>{text}</result>"
        completion = formatted(calls * 3 + "<calc>6 - 2</calc><result>4</result>", text[:1000])
        value, seconds = cpu_seconds(lambda c: fn(c, "6", question="2 apples, 3 pears"), completion)
        assert isinstance(value, float) and math.isfinite(value)
        assert seconds < 0.5, f"{fn.__name__} is slow on a {len(text)}-char result"


def test_tool_results_are_forced_tokens_masked_from_the_model(tiny_model):
    model, tok = load(tiny_model)
    rows = [0, 1, 2, 3]
    _, _, wanted, (out, lengths, ended, _, by_env) = scripted_tool_rollout(model, tok, rows)
    for b, r in enumerate(rows):
        n = int(lengths[b])
        expected = ids_of(tok, wanted[b]) + [tok.eos_token_id]
        assert ended[b] and out[b, :n].tolist() == expected  # the replies replaced the model's '#'s
        env_text = "".join(part for k, part in enumerate(TOOL_SCRIPTS[r]) if k % 2)
        written = [t for t, e in zip(out[b, :n].tolist(), by_env[b, :n].tolist()) if e]
        assert written == ids_of(tok, env_text)  # exactly the tokenized replies are marked as the env's
        starts = [i for i in range(n) if by_env[b, i] and (i == 0 or not by_env[b, i - 1])]
        assert [tok.decode(out[b, i : i + 8].tolist()) for i in starts] == ["<result>"] * len(starts)
        alone = scripted_tool_rollout(model, tok, [r])[3]  # the same row generated by itself
        assert torch.equal(alone[0][0, :n], out[b, :n]) and torch.equal(alone[4][0, :n], by_env[b, :n])
    calls, errors = grpo.tool_use(tok, out, lengths, by_env)
    assert calls == [1, 1, 0, 3] and errors == [0, 0, 0, 1]  # the cap (2) answered the third call with an error
    mask = grpo.completion_mask(lengths, out.shape[1], by_env)
    assert mask.sum(1).tolist() == [len(ids_of(tok, wanted[b])) + 1 - int(by_env[b].sum()) for b in range(4)]


def test_tool_rollout_logprobs_equal_a_full_sequence_recompute(tiny_model):
    """Sampled (temperature 1, nudged towards the scripts): the rollout's log-prob of each sampled
    token equals the policy recomputed on the whole sequence, environment tokens in the context."""
    model, tok = load(tiny_model)
    torch.manual_seed(0)
    ids, mask, _, (out, lengths, _, sample_logp, by_env) = scripted_tool_rollout(
        model, tok, [0, 1, 3], bias=6.0, temperature=1.0
    )
    assert by_env.any()
    scripted = [
        "".join(p if k % 2 == 0 else "#" * len(ids_of(tok, p)) for k, p in enumerate(TOOL_SCRIPTS[r]))
        for r in (0, 1, 3)
    ]
    hook = script_hook(model, tok, mask, [ids_of(tok, s) + [tok.eos_token_id] for s in scripted], 6.0)
    with torch.no_grad():
        full = torch.cat([ids, out], 1)  # (n, P + L): one plain forward, no cache
        full_mask = torch.cat([mask, torch.ones_like(out)], 1)
        position = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=position).logits[:, ids.shape[1] - 1 : -1]
        recompute = torch.log_softmax(logits.float(), -1).gather(-1, out[..., None]).squeeze(-1)  # (n, L)
    hook.remove()  # the hook nudges logits; token_logprobs projects hidden states itself, so compare unhooked
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=position).logits[:, ids.shape[1] - 1 : -1]
        plain = torch.log_softmax(logits.float(), -1).gather(-1, out[..., None]).squeeze(-1)  # (n, L)
        shared = grpo.token_logprobs(model, ids, mask, out, torch.arange(3), 1.0)
    sampled = grpo.completion_mask(lengths, out.shape[1], by_env).bool()
    assert torch.allclose(sample_logp[sampled], recompute[sampled], atol=1e-4)
    own = grpo.completion_mask(lengths, out.shape[1]).bool()
    assert torch.allclose(shared[own], plain[own], atol=1e-4)  # env tokens included


def test_environment_tokens_do_not_change_the_loss_or_its_gradient(tiny_model):
    model, tok = load(tiny_model)
    _, _, _, (out, lengths, _, _, by_env) = scripted_tool_rollout(model, tok, [0, 1, 2, 3])
    prompt_ids, prompt_mask = prompts_of(tok, ["q0", "q1", "q2", "q3"])
    model.train()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with torch.no_grad():
        logp = grpo.token_logprobs(model, prompt_ids, prompt_mask, out, torch.arange(4), 1.0)
    noise = torch.randn(out.shape) * by_env  # changes only where the environment wrote
    for loss_type in grpo.LOSS_TYPES:
        cfg = grpo.Config(loss_type=loss_type, beta=0.04, max_new_tokens=160, mu=2)
        grads = []
        for shift in (0.0, 1.0):
            model.zero_grad()
            old, ref = logp + 0.1 + shift * noise, logp - 0.1 + shift * noise
            stats = grpo.accumulate_gradients(
                model,
                prompt_ids,
                prompt_mask,
                out,
                lengths,
                grpo.completion_mask(lengths, out.shape[1], by_env),
                adv,
                old,
                ref,
                cfg,
                2,
            )
            grads.append((stats["loss"][0], torch.cat([p.grad.flatten() for p in model.parameters()])))
        assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1]), loss_type
    # and directly: the loss has no gradient at the environment's positions
    x = logp.clone().requires_grad_()
    mask = grpo.completion_mask(lengths, out.shape[1], by_env)
    loss, _ = grpo.grpo_loss(x, logp + 0.1, logp - 0.1, adv, mask)
    loss.backward()
    assert (x.grad[by_env] == 0).all() and (x.grad[mask.bool()] != 0).any()


def test_tools_off_path_is_unchanged(tiny_qwen):
    """An environment that never answers leaves the rollout bit for bit as without tools."""
    model, tok = load(tiny_qwen)
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    runs = []
    for env in (None, lambda ids, calls, b=0: None):
        torch.manual_seed(3)
        runs.append(grpo.rollout(model, ids, mask, 3, 16, 1.0, grpo.eos_ids(model, tok), tok.pad_token_id, env=env))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not runs[0][4].any()


def test_main_with_tools_end_to_end(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--tools calculator through main, with evaluation and a reward that varies within groups: the tool
    metrics are logged, every step has a gradient and the weights move."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(digit_share, 1.0)])
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, tools="calculator", eval_every=1, eval_samples=2,
                      micro_batch_size=3)  # fmt: skip
    grpo.main(cfg)
    records = read_metrics(cfg)
    train = [r for r in records if "reward" in r]
    assert len(train) == 2 and all("tool_calls" in r and "tool_errors" in r for r in train)
    assert all(r["grad_norm"] > 0 and r["frac_zero_std"] < 1 for r in train)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(cfg.output_dir + "/final")))
    evals = [r for r in records if "eval/accuracy_strict" in r]
    assert len(evals) == 3 and all("eval/tool_calls" in r and "eval/pass@2" in r for r in evals)
    assert all(math.isfinite(v) for r in records for v in r.values())
    with open(os.path.join(cfg.output_dir, "eval_2.jsonl")) as f:
        assert all("tool_calls" in json.loads(line) for line in f)
    assert "<calc>" in grpo.build_prompt(load(tiny_model)[1], "q", tools="calculator")


# ----------------------------------------------------------------------------- training end to end
METRIC_KEYS = [
    "step",
    "reward",
    "accuracy",
    "kl",
    "loss",
    "clip_frac",
    "completion_len",
    "truncated_frac",
    "frac_zero_std",
    "step_time",
    "tokens_per_s",
]


def test_main_end_to_end(tiny_model, tiny_data, tmp_path, monkeypatch):
    def short_reward(completion: str, answer: str, **kwargs) -> float:  # a user's added reward: varies at random init
        assert kwargs["question"]
        return 1.0 / (1 + len(completion))

    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(short_reward, 1.0)])
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, eval_size=2)
    before, _ = load(tiny_model)
    grpo.main(cfg)
    records = read_metrics(cfg)
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for k in METRIC_KEYS + [f"reward/{f.__name__}" for f, _ in grpo.REWARD_FUNCS]:
            assert k in r and math.isfinite(r[k]), k
    evals = [r for r in records if "eval/accuracy_strict" in r]
    assert [r["step"] for r in evals] == [0, 2]
    after, tok = load(os.path.join(cfg.output_dir, "final"))  # reloads with from_pretrained
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert any(changed)
    assert tok.pad_token_id == tok.eos_token_id
    assert os.path.exists(os.path.join(cfg.output_dir, "eval_2.jsonl"))
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(cfg.output_dir, "metrics.png")) > 10_000


def test_loss_is_zero_at_the_first_step_yet_the_update_is_not(tiny_model, tiny_data, tmp_path, monkeypatch):
    """README, 'Why is the loss 0?': with mu = 1 the ratio is 1 and each group's advantages have mean
    0, so the first step's loss is beta * KL = 0 (the policy is the reference), but the weights move."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(shorter_is_better, 1.0)])
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=1, eval_size=0, beta=0.04)
    grpo.main(cfg)
    (record,) = read_metrics(cfg)
    assert abs(record["loss"]) < 1e-6 and abs(record["kl"]) < 1e-6 and record["frac_zero_std"] < 1
    assert record["grad_norm"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(cfg.output_dir + "/final")))


def test_plot_shows_what_to_watch_and_every_reward_curve(tmp_path, monkeypatch):
    """metrics.png: the weighted total reward alone, each reward function in a panel of its own, the shares the
    README says to watch first (frac_zero_std, truncated_frac), and whole-number steps on every x axis."""
    plt = pytest.importorskip("matplotlib.pyplot")
    figures, savefig = [], plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    records = [{"step": 0, "eval/accuracy_strict": 0.1}] + [
        {"step": s, "reward": 1.0, "reward/a_reward": 0.5, "reward/b_reward": 0.2, "accuracy": 0.3, "kl": 0.01,
         "completion_len": 40, "frac_zero_std": 0.5, "truncated_frac": 0.25} for s in (1, 2)]  # fmt: skip
    write_jsonl(tmp_path / "metrics.jsonl", records)
    grpo.plot_metrics(str(tmp_path))
    (fig,) = figures
    panels = {ax.get_title(): [line.get_label() for line in ax.lines] for ax in fig.axes}
    by_curve = {label: title for title, labels in panels.items() for label in labels}
    assert panels[by_curve["reward"]] == ["reward"]  # the weighted total, apart from the 0-1 per-function curves
    assert panels[by_curve["reward/a_reward"]] == ["reward/a_reward", "reward/b_reward"]
    assert panels[by_curve["frac_zero_std"]] == ["frac_zero_std", "truncated_frac"]
    assert "what to watch" in by_curve["frac_zero_std"]
    assert {"accuracy", "eval/accuracy_strict", "kl", "completion_len"} <= set(by_curve)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), (ax.get_title(), ticks)
    assert os.path.getsize(tmp_path / "metrics.png") > 10_000


def wandb_log_records(path: str) -> list:
    """The records of a wandb run's transaction log (run-<id>.wandb, all that an offline run keeps): leveldb's
    log format, a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
    type: 1 a whole record, 2/3/4 its first/middle/last piece) and a piece of a protobuf Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    with open(path, "rb") as f:
        data = f.read()
    assert b":W&B".startswith(data[:4])  # the format's magic (or the start of it, in a file being written)
    records, piece, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes, too few for a header, are padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        piece, pos = piece + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(piece))
            piece = b""
    return records


def test_report_to_wandb_logs_the_config_and_every_record(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--report_to wandb, for real and offline: the run's log holds the config and, step by step, the very
    records of metrics.jsonl (the step-0 evaluation included)."""
    quiet = dict(WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), **quiet}.items():
        monkeypatch.setenv(k, v)
    wandb = pytest.importorskip("wandb")
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, eval_size=2, report_to="wandb")
    grpo.main(cfg)
    wandb.teardown()  # wandb's own process writes the log: wait for it, as a script's exit does
    for _ in range(60):  # and, should it still be closing the file, a little longer
        found = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
        records = wandb_log_records(found[0]) if found else []
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.5)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if not item.key.startswith("_")}
    assert config == dataclasses_asdict(cfg)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    items = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in history]
    logged = [{"step": item["_step"], **{k: v for k, v in item.items() if not k.startswith("_")}} for item in items]
    assert logged == read_metrics(cfg) and [r["step"] for r in logged] == [0, 1, 2]
    assert records[-1].WhichOneof("record_type") == "exit"  # the run finished


def test_report_to_trackio_logs_the_config_and_every_record(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--report_to trackio (where it is installed): its local database holds the config and each record."""
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    pytest.importorskip("trackio")
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, eval_size=2, report_to="trackio")
    grpo.main(cfg)
    db = sqlite3.connect(tmp_path / "trackio" / "grpo.db")
    ((config,),) = db.execute("select config from configs").fetchall()
    assert {k: v for k, v in json.loads(config).items() if not k.startswith("_")} == dataclasses_asdict(cfg)
    rows = db.execute("select step, metrics from metrics order by id").fetchall()
    logged = [{"step": step, **json.loads(metrics)} for step, metrics in rows]
    assert logged == read_metrics(cfg) and [r["step"] for r in logged] == [0, 1, 2]


def test_report_to_a_missing_package_stops_before_loading(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # 'import wandb' fails, as where it is not installed
    monkeypatch.setattr(grpo, "load_data", lambda cfg: pytest.fail("the data was loaded before the check"))
    with pytest.raises(SystemExit) as e:
        grpo.main(tiny_config(tiny_model, tiny_data, tmp_path, report_to="wandb"))
    assert str(e.value) == (
        "error: --report_to wandb: the wandb package is not installed; pip install wandb, or drop --report_to"
    )
    assert not os.path.exists(tmp_path / "out")  # nothing was written either


def test_main_mu_beta0_and_options(tiny_model, tiny_data, tmp_path, monkeypatch):
    """mu > 1 (old log-probs kept), no reference model, dapo, micro-batches, gradient checkpointing, with a
    reward that varies within groups: every step has a gradient and the weights move."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    cfg = tiny_config(
        tiny_model,
        tiny_data,
        tmp_path,
        mu=2,
        beta=0.0,
        loss_type="dapo",
        micro_batch_size=3,
        gradient_checkpointing=True,
        eval_size=0,
        clip_eps_high=0.28,
    )
    grpo.main(cfg)
    train = [r for r in read_metrics(cfg) if "reward" in r]
    assert len(train) == 2 and all(r["kl"] == 0.0 for r in train)
    assert all(r["grad_norm"] > 0 and r["frac_zero_std"] < 1 for r in train)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(cfg.output_dir + "/final")))


def test_learning_raises_reward(tiny_model, tiny_data, tmp_path, monkeypatch):
    """On a toy task (emit digits) GRPO raises the mean reward far above where it started."""

    def digit_share(completion: str, answer: str, **kwargs) -> float:
        return sum(c.isdigit() for c in completion) / max(1, len(completion))

    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    cfg = tiny_config(
        tiny_model,
        tiny_data,
        tmp_path,
        steps=30,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=8,
        lr=3e-3,
        beta=0.0,
        eval_size=0,
    )
    grpo.main(cfg)
    rewards = [r["reward"] for r in read_metrics(cfg) if "reward" in r]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.3 and end > start + 0.4, rewards


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_metrics_on_known_completions(tiny_model, tiny_data, tmp_path, monkeypatch):
    model, tok = load(tiny_model)
    rows = [
        {"question": "q1", "gold": "3"},
        {"question": "q2", "gold": "4"},
        {"question": "q3", "gold": "5"},
        {"question": "q4", "gold": "6"},
    ]
    completions = [
        "<reasoning>\n1+2\n</reasoning>\n<answer>\n3\n</answer>",  # strict, lenient, format
        "I think it is 4",  # lenient only
        "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>",  # format only
        "<answer>6</answer>",  # strict and lenient, not the format
    ]

    def fake_rollout(model, ids, mask, G, max_new_tokens, temperature, eos, pad_id, env=None):
        n = ids.shape[0]
        texts = completions[fake_rollout.i : fake_rollout.i + n]
        fake_rollout.i += n
        enc = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
        L = max(map(len, enc))
        out = torch.tensor([e + [pad_id] * (L - len(e)) for e in enc])
        return (
            out,
            torch.tensor([len(e) for e in enc]),
            torch.ones(n, dtype=torch.bool),
            torch.zeros(out.shape),
            torch.zeros(out.shape, dtype=torch.bool),
        )

    fake_rollout.i = 0
    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, eval_batch_size=3)
    os.makedirs(cfg.output_dir)
    m = grpo.evaluate(model, tok, rows, cfg, 7, torch.device("cpu"))
    assert m == {"eval/accuracy_strict": 0.5, "eval/accuracy_lenient": 0.75, "eval/format": 0.5}
    with open(os.path.join(cfg.output_dir, "eval_7.jsonl")) as f:
        written = [json.loads(line) for line in f]
    assert [w["completion"] for w in written] == completions
    assert [w["extracted"] for w in written] == ["3", None, "7", "6"]


def test_evaluate_maj_and_pass_at_k(tiny_model, tiny_data, tmp_path, monkeypatch):
    model, tok = load(tiny_model)
    rows = [{"question": "q1", "gold": "3"}, {"question": "q2", "gold": "4"}]
    samples = {
        1: ["<answer>3</answer>", "<answer>0</answer>"],  # greedy: right, wrong
        3: [
            "<answer>3</answer>",
            "<answer>1</answer>",
            "<answer>3</answer>",  # maj 3 (right), pass
            "<answer>4</answer>",
            "<answer>9</answer>",
            "<answer>9</answer>",
        ],
    }  # maj 9 (wrong), pass

    def fake_rollout(model, ids, mask, G, max_new_tokens, temperature, eos, pad_id, env=None):
        enc = [tok(t, add_special_tokens=False).input_ids for t in samples[G]]
        L = max(map(len, enc))
        out = torch.tensor([e + [pad_id] * (L - len(e)) for e in enc])
        return (
            out,
            torch.tensor([len(e) for e in enc]),
            torch.ones(len(enc), dtype=torch.bool),
            torch.zeros(out.shape),
            torch.zeros(out.shape, dtype=torch.bool),
        )

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, eval_samples=3, eval_batch_size=2)
    os.makedirs(cfg.output_dir)
    m = grpo.evaluate(model, tok, rows, cfg, 0, torch.device("cpu"))
    assert m["eval/accuracy_strict"] == 0.5 and m["eval/maj@3"] == 0.5 and m["eval/pass@3"] == 1.0


def read_evaluation(output_dir) -> dict:
    with open(os.path.join(output_dir, "evaluation.json")) as f:
        return json.load(f)


def test_eval_only(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, eval_only=True, eval_size=-1)
    grpo.main(cfg)
    record = read_evaluation(cfg.output_dir)
    assert set(record) == {"model", "problems", "eval/accuracy_strict", "eval/accuracy_lenient", "eval/format"}
    assert record["model"] == tiny_model and record["problems"] == 6
    with open(os.path.join(cfg.output_dir, "evaluation.jsonl")) as f:
        assert len(f.readlines()) == 6  # eval_size -1: the whole test split
    assert sorted(os.listdir(cfg.output_dir)) == ["evaluation.json", "evaluation.jsonl"]  # no metrics.jsonl, no final/


def test_eval_only_into_a_training_folder_changes_none_of_its_files(tiny_model, tiny_data, tmp_path):
    """The README's 'evaluate the trained model' with the training's --output_dir: the run's metrics.jsonl,
    eval_<step>.jsonl and metrics.png stay byte for byte as they were, the evaluation has files of its own."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, eval_size=3)
    grpo.main(cfg)
    out = cfg.output_dir
    files = [name for name in os.listdir(out) if os.path.isfile(os.path.join(out, name))]
    assert {"metrics.jsonl", "eval_0.jsonl", "eval_2.jsonl"} <= set(files)
    before = {name: open(os.path.join(out, name), "rb").read() for name in files}
    grpo.main(dataclasses_replace(cfg, eval_only=True, model=os.path.join(out, "final"), eval_size=-1))
    assert {name: open(os.path.join(out, name), "rb").read() for name in files} == before
    assert set(os.listdir(out)) - set(files) - {"final"} == {"evaluation.json", "evaluation.jsonl"}
    assert read_evaluation(out)["problems"] == 6


# ----------------------------------------------------------------------------- checkpoints and resume
def params_of(path):
    model, _ = load(path)
    return [p.detach().clone() for p in model.parameters()]


def shorter_is_better(completion: str, answer: str, **kwargs) -> float:
    """A reward that varies at random init (the tiny model never writes the tags), so weights move."""
    return 1.0 / (1 + len(completion))


def digit_share(completion: str, answer: str, **kwargs) -> float:
    """A reward on a token: the share of digits. The tiny model writes one now and then at random init, so
    nearly every group's rewards differ and every step has a gradient (a length reward does not: its
    completions mostly run to the token limit, and the character tokenizer makes their lengths equal)."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def test_resume_is_bit_exact(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)])  # weights move
    common = dict(steps=5, save_every=2, eval_size=0, mu=2, lr=3e-3, warmup_steps=3)
    full = tiny_config(tiny_model, tiny_data, tmp_path / "a", **common)
    grpo.main(full)

    def crash(step, *args):
        if step == 4:  # dies after the step-2 checkpoint, in the middle of step 4
            raise KeyboardInterrupt

    part = tiny_config(tiny_model, tiny_data, tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):
        grpo.main(part, on_step=crash)
    assert grpo.latest_checkpoint(part.output_dir).endswith("checkpoint")
    grpo.main(dataclasses_replace(part, resume=True))
    for a, b in zip(
        params_of(os.path.join(full.output_dir, "final")), params_of(os.path.join(part.output_dir, "final"))
    ):
        assert torch.equal(a, b)
    # the metrics file of the resumed run has each step once, and the same numbers
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(part))


def test_each_step_draws_its_own_samples_and_a_resumed_step_the_same(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Every step seeds its sampling from (seed, rank, step): each rollout of a run starts from a random state
    of its own, and a run resumed from a checkpoint starts a step's rollout from the same state as the run
    that never stopped, and draws the same completions."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    draws, rollout = [], grpo.rollout

    def recording(*args, **kwargs):
        state = torch.get_rng_state()
        out = rollout(*args, **kwargs)
        draws.append((state, out[0]))
        return out

    monkeypatch.setattr(grpo, "rollout", recording)
    grpo.main(tiny_config(tiny_model, tiny_data, tmp_path / "a", steps=3, eval_size=0))
    full, draws[:] = list(draws), []
    assert len(full) == 3 and not any(torch.equal(a[0], b[0]) for a, b in itertools.combinations(full, 2))
    part = tiny_config(tiny_model, tiny_data, tmp_path / "b", steps=2, save_every=2, eval_size=0)
    grpo.main(part)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(draws, full[:2]))
    draws[:] = []
    grpo.main(dataclasses_replace(part, resume=True, steps=3))
    ((state, completions),) = draws
    assert torch.equal(state, full[2][0]) and torch.equal(completions, full[2][1])


def frequent_env(tok, max_calls, names="", rows=None):
    """A stand-in for tool_env that even a random model triggers: it answers after every model
    token whose id is a multiple of 5, so runs of main contain environment tokens."""
    reply = tok("<result>1</result>", add_special_tokens=False).input_ids
    return lambda ids, calls, b=0: reply if ids[-1] % 5 == 0 and calls < max_calls else None


FREQUENT_ENV = """
def frequent_env(tok, max_calls, names="", rows=None):
    reply = tok("<result>1</result>", add_special_tokens=False).input_ids
    return lambda ids, calls, b=0: reply if ids[-1] % 5 == 0 and calls < max_calls else None
grpo.tool_env = frequent_env
"""


@pytest.mark.parametrize("tools", ["", "calculator"])
def test_finished_run_extends_bit_exactly(tiny_model, tiny_data, tmp_path, monkeypatch, tools):
    """--steps 2 --save_every 2, then --steps 4 --resume: the same weights as one 4-step run.
    Evaluation samples (eval_samples) at the end of the short run without moving the random stream.
    With tools, environment tokens are in every step's rollouts."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)])
    monkeypatch.setattr(grpo, "tool_env", frequent_env)
    common = dict(save_every=2, eval_size=2, eval_samples=2, mu=2, lr=3e-3, warmup_steps=3, tools=tools)
    full = tiny_config(tiny_model, tiny_data, tmp_path / "a", steps=4, **common)
    grpo.main(full)
    part = tiny_config(tiny_model, tiny_data, tmp_path / "b", steps=2, **common)
    grpo.main(part)
    state = torch.load(os.path.join(part.output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2  # the last step left a checkpoint next to final/
    with pytest.raises(SystemExit, match="--steps 1 is below the checkpoint's step 2"):
        grpo.main(dataclasses_replace(part, resume=True, steps=1))
    grpo.main(dataclasses_replace(part, resume=True, steps=4))
    for a, b in zip(
        params_of(os.path.join(full.output_dir, "final")), params_of(os.path.join(part.output_dir, "final"))
    ):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(full.output_dir + "/final")))
    drop = ("step_time", "tokens_per_s")  # and the evaluations, which the two runs did at different steps
    train = lambda cfg: [{k: v for k, v in r.items() if k not in drop and not k.startswith("eval/")}  # noqa: E731
                         for r in read_metrics(cfg) if "reward" in r]  # fmt: skip
    assert [r["step"] for r in train(part)] == [1, 2, 3, 4]
    assert train(full) == train(part)
    assert all(r["tool_calls"] > 0 for r in train(part)) if tools else "tool_calls" not in train(part)[0]


def dataclasses_asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def dataclasses_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)


def test_interrupted_save_leaves_a_loadable_checkpoint(tiny_model, tmp_path, monkeypatch):
    model, tok = load(tiny_model)
    path = str(tmp_path / "checkpoint")
    grpo.save_atomically(path, model, tok, {"step": 1})
    # a crash while writing the new checkpoint: the old one is untouched
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        grpo.save_atomically(path, model, tok, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    found = grpo.latest_checkpoint(str(tmp_path))
    assert torch.load(os.path.join(found, "trainer_state.pt"))["step"] == 1
    load(found)
    # a crash between the two renames: the previous checkpoint is found under checkpoint.old
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        grpo.save_atomically(path, model, tok, {"step": 3})
    monkeypatch.setattr(os, "replace", real_replace)
    found = grpo.latest_checkpoint(str(tmp_path))
    assert found.endswith("checkpoint.old")
    assert torch.load(os.path.join(found, "trainer_state.pt"))["step"] == 1
    load(found)
    # the next save, with only checkpoint.old on disk, puts the new one in place before deleting the old
    real_rmtree, seen = grpo.shutil.rmtree, []

    def rmtree_checking(p, *a, **k):
        if p.endswith(".old"):
            seen.append(os.path.isfile(os.path.join(path, "trainer_state.pt")))
        real_rmtree(p, *a, **k)

    monkeypatch.setattr(grpo.shutil, "rmtree", rmtree_checking)
    grpo.save_atomically(path, model, tok, {"step": 4})
    assert seen and all(seen)  # checkpoint.old was only ever deleted while a complete checkpoint existed
    assert torch.load(os.path.join(grpo.latest_checkpoint(str(tmp_path)), "trainer_state.pt"))["step"] == 4
    assert not os.path.exists(path + ".old")


def test_stale_checkpoint_and_changed_config_are_refused(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=3, save_every=1, eval_size=0)
    grpo.main(cfg)
    with pytest.raises(SystemExit, match="holds an earlier run: pass --resume"):
        grpo.main(cfg)  # a fresh run would leave the old checkpoint to be resumed by mistake
    with pytest.raises(SystemExit, match="changed --seed, --group_size"):
        grpo.main(dataclasses_replace(cfg, resume=True, steps=4, seed=1, group_size=2))
    grpo.main(dataclasses_replace(cfg, resume=True, steps=4))
    assert [r["step"] for r in read_metrics(cfg)] == [1, 2, 3, 4]


def test_resume_takes_the_saved_config_and_each_flag_given(tiny_model, tiny_data, tmp_path, capsys):
    """A resumed run is the checkpoint's configuration: a flag left out keeps its saved value (not Config's
    default), a flag given takes effect and is named in one line, a data-order flag is refused."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, save_every=1, eval_size=0, lr=1e-5, max_new_tokens=8)
    grpo.main(cfg)
    capsys.readouterr()

    def resume(*flags):  # as from the shell: python grpo.py --output_dir DIR --resume --device cpu FLAGS
        new, given = grpo.parse_config(["--output_dir", cfg.output_dir, "--resume", "--device", "cpu", *flags])
        grpo.main(new, given=given)

    with pytest.raises(SystemExit, match="changed --seed: the checkpoint's data order"):
        resume("--steps", "3", "--seed", "1")
    # --lr and --weight_decay take effect (the restored optimizer and schedule held 1e-05 and 0.0); --max_new_tokens,
    # --model and --dataset are not given: the saved 8, tiny model and data, not Config's 400 and Qwen on GSM8K
    resume("--steps", "3", "--lr", "1e-3", "--weight_decay", "0.01")
    said = capsys.readouterr().out.splitlines()[0]
    assert said == "resume: --steps 2 -> 3, --lr 1e-05 -> 0.001, --weight_decay 0.0 -> 0.01"
    records = read_metrics(cfg)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == [1e-5, 1e-5, 1e-3]
    assert records[2]["completion_len"] <= 8  # a random model's answers run to the cap: 8, not 400
    state = torch.load(os.path.join(cfg.output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["config"]["lr"] == 1e-3 and state["config"]["max_new_tokens"] == 8  # the next resume goes on alike
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.01
    # a flag given with its saved value changes nothing and says nothing
    resume("--steps", "4", "--max_new_tokens", "8")
    assert capsys.readouterr().out.splitlines()[0] == "resume: --steps 3 -> 4"
    assert read_metrics(cfg)[3]["lr"] == 1e-3


class Payload:
    """Unpickling this calls open(path, "w"): a stand-in for code hidden in a shared checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_holds_code(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, save_every=1, eval_size=0)
    grpo.main(cfg)
    path = os.path.join(grpo.latest_checkpoint(cfg.output_dir), "trainer_state.pt")
    state = torch.load(path, weights_only=True)  # what grpo.py writes is plain data
    marker = tmp_path / "code-ran"
    state["config"]["note"] = Payload(str(marker))
    torch.save(state, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(SystemExit) as e:
        grpo.main(dataclasses_replace(cfg, resume=True, steps=3))
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and "could run code" in msg and "trainer_state.pt" in msg
    assert not marker.exists()


def test_non_finite_updates_are_skipped_then_stop(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def nan_once(completion, answer, **kwargs):  # NaN rewards on the first step's completions only
        calls["n"] += 1
        return float("nan") if calls["n"] <= 8 else float(len(completion) % 3)

    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(nan_once, 1.0)])
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=3, eval_size=0, warmup_steps=2)
    with warnings.catch_warnings():  # no "lr_scheduler.step() before optimizer.step()" after a skipped update
        warnings.filterwarnings("error", message=".*lr_scheduler.step")
        grpo.main(cfg)
    train = [r for r in read_metrics(cfg) if "reward" in r]
    assert [r["skipped_updates"] for r in train] == [1, 1, 1]
    # the rate each step's update used (step 1's was skipped), and the warmup counts applied updates only
    assert [r["lr"] for r in train] == [0.5e-3, 0.5e-3, 1e-3]
    assert all(torch.isfinite(p).all() for p in params_of(os.path.join(cfg.output_dir, "final")))

    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(lambda c, a, **k: float("nan"), 1.0)])
    before = params_of(tiny_model)
    seen = []
    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "b", steps=10, eval_size=0)
    with pytest.raises(SystemExit, match="non-finite updates in a row"):
        grpo.main(cfg, on_step=lambda step, model, *a: seen.append([p.detach().clone() for p in model.parameters()]))
    assert len(seen) == 2  # steps 1 and 2 skipped and logged; step 3 stops the run
    assert all(torch.equal(a, b) for a, b in zip(before, seen[-1]))  # weights untouched


# ----------------------------------------------------------------------------- bad input
def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "grpo.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_errors(tiny_model, tiny_data, tmp_path):
    out = ["--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    assert_one_line_error(run_cli("--model", str(tmp_path / "missing"), "--dataset", tiny_data, *out), "does not exist")
    assert_one_line_error(
        run_cli("--model", "nobody-here/no-such-model", "--dataset", tiny_data, *out),
        "nobody-here/no-such-model",
        "network",
    )
    assert_one_line_error(run_cli("--model", tiny_model, "--group_size", "1", *out), "group_size")


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(group_size=1), ["group_size", "2 or more"]),
        (dict(loss_type="ppo"), ["loss_type", "grpo, dapo, dr_grpo"]),
        (dict(prompts_per_step=0), ["prompts_per_step"]),
        (dict(dataset="/no/such/data.jsonl"), ["does not exist"]),
        (dict(dataset="./missing_folder"), ["does not exist"]),
        (dict(dataset="no-such-org/no-such-dataset"), ["could not load dataset"]),
        (dict(model="/no/such/model"), ["does not exist"]),
        (dict(resume=True), ["no checkpoint"]),
        (dict(device="tpu-ish"), ["unknown --device"]),
        (dict(save_every=-1), ["--save_every"]),
        (dict(precision="fp16"), ["--precision", "auto, fp32 or bf16"]),
        (dict(report_to="tensorboard"), ["--report_to", "none, wandb, trackio"]),
    ],
)
def test_bad_config_errors(tiny_model, tiny_data, tmp_path, kw, words):
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, **kw)
    with pytest.raises(SystemExit) as e:
        grpo.main(cfg)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg
    for w in words:
        assert w in msg


def test_dataset_errors(tiny_model, tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": "1+1", "solution": "2"}])
    cfg = grpo.Config(dataset=str(data))
    with pytest.raises(
        SystemExit, match=r"lacks column\(s\) \['answer', 'question'\]; it has \['prompt', 'solution'\]"
    ):
        grpo.load_rows(cfg, "train")
    write_jsonl(data / "train.jsonl", [{"question": "a", "answer": "no marker"}] * 3)
    with pytest.raises(SystemExit, match="none of the 3 answers"):
        grpo.load_rows(cfg, "train")
    rows = arithmetic_rows(4, 0) + [{"question": "a", "answer": "no marker"}]
    write_jsonl(data / "train.jsonl", rows)
    assert len(grpo.load_rows(cfg, "train")) == 4
    assert "skipped 1 of 5 train rows" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no test"):
        grpo.load_rows(cfg, "test")
    write_jsonl(tmp_path / "single.jsonl", rows[:4])
    assert len(grpo.load_rows(grpo.Config(dataset=str(tmp_path / "single.jsonl")), "train")) == 4
    with pytest.raises(SystemExit, match="has no test split"):
        grpo.load_rows(grpo.Config(dataset=str(tmp_path / "single.jsonl")), "test")


def test_plain_numeric_answers_are_their_own_gold(tmp_path, capsys):
    """People's own data: an answer that is one number (a string or a JSON number) is the gold answer;
    GSM8K's '#### N' still works; anything else is skipped with a count, or named with both forms."""
    rows = [{"question": "2+3?", "answer": "5"}, {"question": "q", "answer": " 1,234 "}, {"question": "q", "answer": -3},
            {"question": "q", "answer": "3.5"}, {"question": "q", "answer": "so\n#### 7"}, {"question": "q", "answer": "five"},
            {"question": "q", "answer": "2+3"}]  # fmt: skip
    for i, row in enumerate(rows):  # each row alone, so that the JSON column types never mix
        write_jsonl(tmp_path / f"r{i}.jsonl", [row])
    golds = []
    for i in range(5):
        golds += [r["gold"] for r in grpo.load_rows(grpo.Config(dataset=str(tmp_path / f"r{i}.jsonl")), "train")]
    assert golds == ["5", "1234", "-3", "3.5", "7"]
    assert grpo.correctness_reward("<answer>1,234</answer>", "1234") == 1.0
    write_jsonl(tmp_path / "mixed.jsonl", [{"question": "q", "answer": a} for a in ["5", "so\n#### 7", "five", "2+3"]])
    assert [r["gold"] for r in grpo.load_rows(grpo.Config(dataset=str(tmp_path / "mixed.jsonl")), "train")] == [
        "5",
        "7",
    ]
    assert "skipped 2 of 4 train rows" in capsys.readouterr().err
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "five"}])
    with pytest.raises(SystemExit) as e:
        grpo.load_rows(grpo.Config(dataset=str(tmp_path / "bad.jsonl")), "train")
    assert "\n" not in str(e.value) and "'#### <number>'" in str(e.value) and "1,234" in str(e.value)


def test_offline_hub_error_names_the_local_way(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        grpo.load_rows(grpo.Config(dataset="nobody/no-such-dataset"), "train")
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value) and "--dataset" in str(e.value)


def test_single_data_file_trains_without_evaluation(tiny_model, tmp_path, capsys):
    single = tmp_path / "mine.jsonl"
    write_jsonl(single, arithmetic_rows(16, 0))
    cfg = tiny_config(tiny_model, str(single), tmp_path, eval_size=3)
    grpo.main(cfg)
    notes = [line for line in capsys.readouterr().err.splitlines() if "evaluation off" in line]
    assert len(notes) == 1 and "a folder with train and test files" in notes[0]
    records = read_metrics(cfg)
    assert [r["step"] for r in records] == [1, 2] and not any(k.startswith("eval/") for r in records for k in r)
    load(os.path.join(cfg.output_dir, "final"))
    # --eval_only evaluates the one file
    cfg = tiny_config(tiny_model, str(single), tmp_path / "e", eval_only=True, eval_size=-1)
    grpo.main(cfg)
    with open(os.path.join(cfg.output_dir, "evaluation.jsonl")) as f:
        assert len(f.readlines()) == 16


def test_data_is_checked_before_anything_else(tiny_model, tmp_path, monkeypatch):
    """Wrong columns or answers are reported first, even with a missing model and no checkpoint."""
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    single = tmp_path / "mine.jsonl"
    for rows, words in [
        ([{"prompt": "1+1", "solution": "2"}], "lacks column(s) ['answer', 'question']"),
        ([{"question": "1+1", "answer": "two"}], "none of the 1 answers"),
    ]:
        write_jsonl(single, rows)
        cfg = tiny_config("/no/such/model", str(single), tmp_path, resume=True, device="tpu-ish")
        with pytest.raises(SystemExit) as e:
            grpo.main(cfg)
        assert str(e.value).startswith("error:") and words in str(e.value)


def test_parse_config_flags():
    cfg, given = grpo.parse_config(["--steps", "7", "--no-scale_rewards", "--beta", "0", "--loss_type", "dr_grpo"])
    assert (cfg.steps, cfg.scale_rewards, cfg.beta, cfg.loss_type) == (7, False, 0.0, "dr_grpo")
    assert given == {"steps", "scale_rewards", "beta", "loss_type"}  # what a resumed run takes from the command line
    assert grpo.parse_config([]) == (grpo.Config(), set())
    assert grpo.parse_config(["--max_new_tokens", "400"])[1] == {"max_new_tokens"}  # given, though the default


def test_flags_take_dashes_and_are_never_abbreviated():
    dashed = grpo.parse_config(["--group-size", "4", "--no-scale-rewards", "--max-new-tokens=48", "--eval-only"])
    underscored = grpo.parse_config(["--group_size", "4", "--no-scale_rewards", "--max_new_tokens=48", "--eval_only"])
    assert dashed == underscored and dashed[0].group_size == 4 and dashed[0].scale_rewards is False
    for argv, message in [
        (["--step", "3"], "error: unknown flag --step: did you mean --steps?"),  # a prefix is not a flag
        (["--group-sise", "4"], "error: unknown flag --group-sise: did you mean --group_size?"),
        (["--no-scale-reward"], "error: unknown flag --no-scale-reward: did you mean --no-scale_rewards?"),
        (["--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
    ]:
        with pytest.raises(SystemExit) as e:
            grpo.parse_config(argv)
        assert str(e.value) == message
    result = run_cli("--step", "3")  # from the shell: one line, no usage text, before anything is loaded
    assert result.returncode == 1 and result.stderr.strip() == "error: unknown flag --step: did you mean --steps?"
    shown = run_cli("--help").stdout
    for f in dataclasses_fields(grpo.Config):  # each flag listed once, in its underscore spelling
        assert len(re.findall(rf"^  --{f.name}\b", shown, re.M)) == 1, f.name
    assert "--group-size" in shown and "--max-new-tokens" not in shown  # the epilog's example, no dashed duplicates


def test_prompt_indices_cover_each_epoch():
    first = grpo.prompt_indices(10, 0, 10, seed=3)
    assert sorted(first) == list(range(10))
    assert grpo.prompt_indices(10, 4, 8, seed=3) == first[4:] + grpo.prompt_indices(10, 10, 2, seed=3)


# ----------------------------------------------------------------------------- distributed
DDP_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import grpo
def digit_share(completion, answer, **kwargs):  # varies within groups at random init: a gradient every step
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
grpo.REWARD_FUNCS = [(digit_share, 1.0)]
cfg = grpo.Config(**json.loads(sys.argv[1]))
records, tensors = [], []
def on_step(step, model, metrics, sums):
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters' alone
    tensors.append((torch.cat(grads), flat.clone()))
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    records.append({{"step": step, "same": all(torch.equal(gathered[0], g) for g in gathered), "sums": sums,
                     "metrics": metrics}})
grpo.main(cfg, on_step=on_step)
with open(os.path.join(cfg.output_dir, f"rank{{int(os.environ['RANK'])}}.json"), "w") as f:
    json.dump(records, f)
torch.save(tensors, os.path.join(cfg.output_dir, f"rank{{int(os.environ['RANK'])}}.pt"))  # each step's gradient, weights
threads = sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(cfg.output_dir, f"threads{{int(os.environ['RANK'])}}.json"), "w") as f:
    json.dump(threads, f)  # the threads still running once main has returned
"""


def assert_process_group_gone(output_dir: str) -> None:
    """Once main has returned, no rank has a gloo thread left: the process group was destroyed, not left to
    interpreter exit, where a gloo thread that needs the GIL to free a tensor aborts the process (SIGABRT)."""
    for rank in range(2):
        with open(os.path.join(output_dir, f"threads{rank}.json")) as f:
            threads = json.load(f)
        assert not [t for t in threads if "gloo" in t], threads


@pytest.mark.parametrize("tools", ["", "calculator"])
def test_distributed_two_processes(tiny_model, tiny_data, tmp_path, tools):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(here=HERE).replace("grpo.main(cfg,", FREQUENT_ENV + "grpo.main(cfg,"))
    overrides = dict(steps=3, prompts_per_step=4, eval_size=4, eval_every=2, save_every=2, warmup_steps=10, tools=tools,
                     precision="bf16" if tools else "fp32")  # fmt: skip  # tools, torchrun and its resume as a GPU runs them
    cfg = dataclasses_asdict(tiny_config(tiny_model, tiny_data, tmp_path, loss_type="dapo", **overrides))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on localhost
        "--nproc_per_node",
        "2",
        str(script),
        json.dumps(cfg),
    ]
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack, so a failure says where it was
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    assert_process_group_gone(tmp_path / "out")
    ranks = [json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in range(2)]
    assert [r["step"] for r in ranks[0]] == [1, 2, 3]
    counts_differ = []
    for step in range(3):
        a, b = ranks[0][step], ranks[1][step]
        assert a["same"] and b["same"]  # parameters identical on both ranks after every step
        timing = ("step_time", "tokens_per_s")  # each rank's own clock
        assert {k: v for k, v in a["metrics"].items() if k not in timing} == {
            k: v for k, v in b["metrics"].items() if k not in timing
        }
        for k, (total_a, count_a) in a["sums"].items():  # means weighted by counts (tokens for kl, clip_frac)
            total_b, count_b = b["sums"][k]
            assert a["metrics"][k] == pytest.approx((total_a + total_b) / (count_a + count_b), rel=1e-9, abs=1e-12)
        counts_differ.append(a["sums"]["kl"][1] != b["sums"]["kl"][1])
        assert a["metrics"]["grad_norm"] > 0 and a["metrics"]["frac_zero_std"] < 1  # so "same" above can fail
        assert a["metrics"]["tool_calls"] > 0 if tools else "tool_calls" not in a["metrics"]
    assert any(counts_differ)  # somewhere the ranks' token counts differ, so the weighting above is tested
    assert_each_step_logged_once_for_both_ranks(tmp_path / "out", ranks)
    logged = [r for r in read_metrics(grpo.Config(output_dir=cfg["output_dir"])) if "reward" in r]
    assert [r["reward"] for r in logged] == pytest.approx([r["metrics"]["reward"] for r in ranks[0]])
    assert os.path.exists(tmp_path / "out" / "final" / "config.json")
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(tmp_path / "out" / "final")))
    assert os.path.exists(tmp_path / "out" / "checkpoint" / "trainer_state.pt")
    with open(tmp_path / "out" / "eval_3.jsonl") as f:
        assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3]  # sharded eval, gathered in order
    # --resume under torchrun: the last step (3) left a checkpoint; extend the run from it to step 5
    assert torch.load(tmp_path / "out" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 3
    cmd[-1] = json.dumps({**cfg, "steps": 5, "resume": True, "eval_size": 0})
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    assert_process_group_gone(tmp_path / "out")
    resumed = json.load(open(tmp_path / "out" / "rank0.json"))
    assert [r["step"] for r in resumed] == [4, 5] and all(r["same"] for r in resumed)
    steps = [r["step"] for r in read_metrics(grpo.Config(output_dir=cfg["output_dir"])) if "reward" in r]
    assert steps == [1, 2, 3, 4, 5]
    if tools:
        return
    # --eval_only under torchrun: the trained model evaluated on both ranks, and both ranks exit cleanly
    evaluated = str(tmp_path / "eval_only")
    cmd[-1] = json.dumps({**cfg, "model": str(tmp_path / "out" / "final"), "eval_only": True, "output_dir": evaluated})
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    assert_process_group_gone(evaluated)
    record = read_evaluation(evaluated)
    assert record["problems"] == 4 and "eval/accuracy_strict" in record
    with open(os.path.join(evaluated, "evaluation.jsonl")) as f:
        assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3]


def test_torchrun_one_process_is_unchanged(tiny_model, tiny_data, tmp_path, monkeypatch):
    """torchrun with one process trains exactly as a plain run: the same metrics and weights, bit for bit,
    with a reward that varies within groups (the script's), so the weights move and a difference could show."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(here=HERE).replace("dist.get_world_size()", "max(1, dist.get_world_size() if dist.is_initialized() else 1)").replace("dist.all_gather(gathered, flat)", "gathered = [flat]"))  # fmt: skip
    cfg = dataclasses_asdict(tiny_config(tiny_model, tiny_data, tmp_path, eval_size=0, warmup_steps=10))
    del cfg["output_dir"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           json.dumps({**cfg, "output_dir": str(tmp_path / "t")})]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = grpo.Config(**cfg, output_dir=str(tmp_path / "p"))
    grpo.main(plain)
    timing = ("step_time", "tokens_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(plain)) == strip(read_metrics(grpo.Config(output_dir=str(tmp_path / "t"))))
    for a, b in zip(params_of(str(tmp_path / "p" / "final")), params_of(str(tmp_path / "t" / "final"))):
        assert torch.equal(a, b)
    assert all(r["grad_norm"] > 0 for r in read_metrics(plain) if "reward" in r)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(tiny_model), params_of(str(tmp_path / "p" / "final"))))


def generate_by_question(generate):
    """grpo.generate, but each question's G completions are drawn from a random stream of their own, seeded
    by the question: a rank that holds half of a step's questions then samples what one process holding
    them all samples for that half (the default seeds each rank's whole batch from (seed, rank, step))."""

    def run(sampler, tok, questions, group_size, temperature, cfg, device, rows=None):
        parts = []
        for i, q in enumerate(questions):
            torch.manual_seed(zlib.crc32(q.encode()))
            parts.append(generate(sampler, tok, [q], group_size, temperature, cfg, device, rows and rows[i : i + 1]))
        prompts = [grpo.build_prompt(tok, q, tools=cfg.tools) for q in questions]
        ids, mask = grpo.tokenize_prompts(tok, prompts, device)  # (N, P) left-padded, as generate returns them
        L = max(part.completion_ids.shape[1] for part in parts)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)  # noqa: E731
        completions = [pad(p.completion_ids, tok.pad_token_id) for p in parts]
        logp, by_env = [pad(p.sample_logp, 0.0) for p in parts], [pad(p.by_env, False) for p in parts]
        lengths, ended = [p.lengths for p in parts], [p.ended for p in parts]
        texts = [t for p in parts for t in p.texts]
        return grpo.Rollout(ids, mask, *map(torch.cat, (completions, lengths, ended, logp, by_env)), texts)

    return run


# Under torchrun: before each micro-batch's forward in training, the storages that the gradients live in
GRAD_STORAGES = """
real_token_logprobs, grad_storages = grpo.token_logprobs, []
def token_logprobs(model, *args):
    if torch.is_grad_enabled():  # the update pass, not the reference pass
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        grad_storages.append(None if any(g is None for g in grads) else sorted({g.untyped_storage().data_ptr() for g in grads}))
    return real_token_logprobs(model, *args)
grpo.token_logprobs = token_logprobs
"""


def test_torchrun_averages_gradients_like_one_process_on_both_ranks_data(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Two ranks under torchrun against one process that holds both ranks' questions (each question's
    completions drawn from its own stream, so both runs sample the same ones), with dapo and micro-batches
    of 3 (each micro-batch's share of the global token count): at every step the gradient that DDP leaves
    on the ranks equals the one process's gradient, and the weights equal its weights. Ranks that did not
    average, or weighted by their own token count, would each follow their half of the batch.
    And from the second step on, every micro-batch adds into the gradients where DDP's buckets hold them
    (gradient_as_bucket_view): zeroed in place, never set to None, which would make them fresh tensors, a
    second gradient-sized copy per rank, until the last micro-batch copies them into the buckets."""
    script = tmp_path / "ddp_run.py"
    by_question = (
        "import zlib\n"
        + inspect.getsource(generate_by_question)
        + "grpo.generate = generate_by_question(grpo.generate)\n"
        + GRAD_STORAGES
    )
    script.write_text(
        DDP_SCRIPT.format(here=HERE).replace("grpo.main(cfg,", by_question + "grpo.main(cfg,")
        + "json.dump(grad_storages, open(os.path.join(cfg.output_dir, f'storages{os.environ[\"RANK\"]}.json'), 'w'))\n"
    )
    cfg = dataclasses_asdict(tiny_config(tiny_model, tiny_data, tmp_path, steps=2, prompts_per_step=4, eval_size=0,
                                         loss_type="dapo", micro_batch_size=3, max_grad_norm=1e9))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(cfg)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    counts = [[s["sums"]["kl"][1] for s in json.load(open(tmp_path / "out" / f"rank{r}.json"))] for r in range(2)]
    for r in range(2):  # 2 steps of 3 micro-batches (2 questions x G = 4 completions, 3 at a time): 6 forwards
        storages = json.load(open(tmp_path / "out" / f"storages{r}.json"))
        assert len(storages) == 6 and storages[0] is None  # before the first backward there is no gradient
        # step 1's first reduction makes the gradients views of DDP's buckets (a few storages for all of them; the
        # second iteration's first forward rebuilds the buckets once, in the order the gradients came)
        assert all(s is not None and len(s) <= 4 for s in storages[3:]) and storages[5] == storages[4], storages

    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])  # the script's reward
    monkeypatch.setattr(grpo, "generate", generate_by_question(grpo.generate))
    single = []
    on_step = lambda step, model, metrics, sums: single.append(  # noqa: E731
        (torch.cat([p.grad.flatten() for p in model.parameters()]), torch.cat([p.detach().flatten() for p in model.parameters()]))
    )  # fmt: skip
    grpo.main(grpo.Config(**{**cfg, "output_dir": str(tmp_path / "one")}), on_step=on_step)
    initial = torch.cat([p.flatten() for p in params_of(tiny_model)])
    for step in range(2):
        (grad0, weights0), (grad1, weights1), (grad, weights) = ranks[0][step], ranks[1][step], single[step]
        assert torch.equal(weights0, weights1) and torch.equal(grad0, grad1)
        assert_same_gradient(grad0, grad)
        assert (weights0 - weights).abs().max() < 1e-5  # Adam moves each weight by about lr = 1e-3 per step
        assert (weights - initial).abs().max() > 1e-4
    assert counts[0] != counts[1]  # the ranks' token counts differ, so the global count matters


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_end_distributed_waits_then_takes_the_group_down(tmp_path, monkeypatch, backend):
    """The end of a torchrun run: gloo waits with monitored_barrier (its barrier() can abort the exit),
    nccl (the CUDA path, played here by a one-process gloo group) with barrier(); then no group is left."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    waited = []
    monkeypatch.setattr(dist, "get_backend", lambda *args: backend)
    for name in ("barrier", "monitored_barrier"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _name=name, _real=real, **k: (waited.append(_name), _real(*a, **k)))
    grpo.end_distributed()
    assert waited == ["monitored_barrier" if backend == "gloo" else "barrier"]
    assert not dist.is_initialized()


def test_prompts_must_divide_over_ranks(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "setup_distributed", lambda cfg: (0, 3, torch.device("cpu")))
    with pytest.raises(SystemExit, match="does not divide over 3 processes"):
        grpo.main(tiny_config(tiny_model, tiny_data, tmp_path, prompts_per_step=4))


# ----------------------------------------------------------------------------- real model (opt-in)
@pytest.mark.skipif(
    not (os.environ.get("GRPO_TEST_MODEL") and os.environ.get("GRPO_TEST_DATA")),
    reason="set GRPO_TEST_MODEL (model folder) and GRPO_TEST_DATA (dataset path)",
)
def test_integration_real_model(tmp_path, monkeypatch):
    """Two steps on a real model and GSM8K, the default rewards plus one that varies within groups: the
    rollout's log-probs (decoded with the KV cache) equal the training forward's on this architecture, every
    step has a gradient, the update moves the policy away from the reference (kl 0 at step 1, > 0 at step 2)
    and reaches the saved weights."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(digit_share, 1.0)])
    cfg = grpo.Config(
        model=os.environ["GRPO_TEST_MODEL"],
        dataset=os.environ["GRPO_TEST_DATA"],
        output_dir=str(tmp_path / "out"),
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=24,
        eval_size=4,
        eval_batch_size=4,
        save_every=0,
        sample_every=1,
        device="cpu",
    )
    grpo.main(cfg)
    train = [r for r in read_metrics(cfg) if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 < r["completion_len"] <= 24 for r in train)
    load(os.path.join(cfg.output_dir, "final"))
    # fp32: the sampler is the policy, so |log rho| is float noise between the rollout's cached decode and the
    # training forward (measured 1.7e-5 on SmolLM2-135M); a position, mask or cache that the two paths set up
    # differently on this architecture shows as whole nats. The kl at step 2 measured 1.8e-5.
    assert all(r["logp_mismatch"] < 1e-4 and r["grad_norm"] > 0 and r["frac_zero_std"] < 1 for r in train)
    assert train[0]["kl"] < 1e-6 < train[1]["kl"]
    assert not all(torch.equal(a, b) for a, b in zip(params_of(cfg.model), params_of(cfg.output_dir + "/final")))


def test_flags_table_matches_config():
    """docs/runs.md's table of flags (the README links to it) has every Config field with its default."""
    import dataclasses
    import re

    with open(os.path.join(HERE, "docs", "runs.md")) as f:
        rows = re.findall(r"^\| `--(\w+)`.*? \| `(.*?)` \|", f.read(), re.M)
    documented = dict(rows)
    fields = {f.name: repr(f.default) for f in dataclasses.fields(grpo.Config)}
    assert documented == fields


def test_readme_objective_map_names_tagged_lines():
    """The README maps each term (1)-(5) to a line of code by its tag: each quoted line must exist in
    grpo_loss with that tag, so editing anything else (a reward, say) never breaks the map."""
    import inspect
    import re

    with open(os.path.join(HERE, "README.md")) as f:
        table = f.read().split("| term | code in `grpo_loss` |")[1].split("\n\n")[0]
    source = inspect.getsource(grpo.grpo_loss)
    terms = set()
    for row in table.splitlines()[2:]:
        term = re.match(r"\| \((\d)\)", row).group(1)
        quoted = re.findall(r"`([^`]+?)  # \((\d)\)`", row)
        assert quoted, row
        for code, tag in quoted:
            assert tag == term and f"{code}  # ({tag})" in source, (code, tag)
        terms.add(term)
    assert terms == {"1", "2", "3", "4", "5"}


def test_bench_runs_the_bf16_path(tiny_qwen):
    """bench.py end to end on the tiny Qwen2: both paths, the bf16 sampler."""
    args = ["--model", tiny_qwen, "--random_init", "--prompts", "2", "--group_size", "2", "--prompt_len", "16"]
    args += ["--new_tokens", "6", "--precision", "bf16", "--repeats", "1", "--device", "cpu"]
    result = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["fast"]["seconds"]["step"] > 0 and summary["plain"]["seconds"]["step"] > 0
    assert set(summary["speedup"]) >= {"rollout", "decode", "step"}


def test_bench_prints_a_row_for_a_path_that_runs_out_of_time(tiny_qwen):
    """bench.py's phase table under a time limit per path (--path_timeout) too short for either: each path is
    still a row, saying it did not finish, the JSON line still prints, and the exit status says it failed."""
    args = ["--model", tiny_qwen, "--random_init", "--prompts", "2", "--group_size", "2", "--prompt_len", "16"]
    args += ["--new_tokens", "6", "--repeats", "1", "--device", "cpu", "--path_timeout", "1"]
    result = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *args], capture_output=True, text=True)
    assert result.returncode != 0 and "fast and plain paths did not finish" in result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("fast ", "plain "))]
    assert len(rows) == 2 and all("did not finish in its 1 s" in row for row in rows), result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["speedup"] == {} and "error" in summary["fast"] and "error" in summary["plain"]


def test_bench_memory_predicts_a_step_by_kind(tiny_qwen):
    """bench.py --memory on the tiny Qwen2 (fake tensors, MemTracker): the kinds add up to the peak,
    the weights and the KV cache are the sizes worked out by hand, a larger micro-batch needs more, and
    a decode loop cut short and counted predicts what the whole loop measures."""
    from transformers import AutoConfig, AutoModelForCausalLM

    N, G, P, L = 2, 2, 32, 8
    args = [os.path.join(HERE, "bench.py"), "--memory", "--model", tiny_qwen, "--prompts", str(N), "--group_size"]
    args += [str(G), "--prompt_len", str(P), "--new_tokens", str(L), "--micro_batch_size"]
    procs = {  # both at once: most of each run is importing torch
        mb: subprocess.Popen(
            [sys.executable, *args, str(mb), "--decode_steps", "3" if mb == 2 else "-1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mb in (2, 4)
    }
    runs = {}
    for mb, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        runs[mb] = json.loads(out.strip().splitlines()[-1])
    small, large = runs[2], runs[4]
    config = AutoConfig.from_pretrained(tiny_qwen)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())  # tied embeddings once
    parts = small["breakdown_bytes"]
    assert small["peak_gib"] > 0 and small["peak_phase"] == "policy_fwd_bwd"
    assert sum(parts.values()) == small["peak_bytes"]
    assert small["peak_gib"] == pytest.approx(small["peak_bytes"] / 2**30)
    assert (parts["weights"], parts["sampler"], parts["reference"]) == (4 * n, 2 * n, 2 * n)  # fp32 policy, 2 bf16
    assert parts["gradients"] == 4 * n and parts["optimizer_state"] >= 8 * n  # 2nd micro-batch: every gradient
    assert parts["activations"] > 0 and parts["backward_temporaries"] > 0
    head_dim = config.hidden_size // config.num_attention_heads
    analytic = 2 * config.num_hidden_layers * N * G * (P + L) * config.num_key_value_heads * head_dim * 2  # bf16 K, V
    assert large["kv_cache_analytic_bytes"] == analytic and large["decode_steps_run"] == L
    kv = large["phase_kv_cache_bytes"]["decode"]  # the last step's: P + L - 1 slots (the last token is not fed)
    assert analytic * (P + L - 2) / (P + L) <= kv <= analytic * (P + L - 1) / (P + L)
    assert small["decode_steps_run"] == 3  # 3 of 8 run, the KV cache of the other 5 counted: within one token
    decode = small["phase_peak_gib"]["decode"] - large["phase_peak_gib"]["decode"]
    assert abs(decode) * 2**30 <= analytic / (P + L)
    assert large["peak_bytes"] > small["peak_bytes"]
    assert large["breakdown_bytes"]["activations"] > parts["activations"]


def test_bench_memory_runs_two_micro_batches_for_all(tiny_qwen):
    """bench.py --memory runs the reference and update passes on the first two micro-batches only: the first
    allocates the gradients, the second is the steady state the others repeat. Every phase's peak is that of
    the run over all four, less at most the other rows' (B, L) log-probs and masks."""
    N, G, P, L, mb = 4, 2, 32, 4, 2
    args = [os.path.join(HERE, "bench.py"), "--memory", "--model", tiny_qwen, "--prompts", str(N), "--group_size"]
    args += [str(G), "--prompt_len", str(P), "--new_tokens", str(L), "--micro_batch_size", str(mb), "--decode_steps"]
    procs = {  # both at once: most of each run is importing torch
        n: subprocess.Popen(
            [sys.executable, *args, "1", "--micro_batches_run", n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for n in ("2", "-1")
    }
    runs = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        runs[n] = json.loads(out.strip().splitlines()[-1])
    two, every = runs["2"], runs["-1"]
    assert (two["micro_batches_run"], every["micro_batches_run"]) == (2, 4)
    assert two["peak_phase"] == every["peak_phase"] == "policy_fwd_bwd"
    rows_bytes = (N * G - 2 * mb) * L * 4  # the fp32 (rows, L) entries of the micro-batches not run
    for phase, gib in every["phase_peak_gib"].items():
        missing = (gib - two["phase_peak_gib"][phase]) * 2**30
        assert 0 <= missing <= 4 * rows_bytes, (phase, missing, rows_bytes)  # log-probs, mask, their parts


def test_bench_job_trains_grpo_and_trl_on_the_same_work(tiny_qwen, tiny_data, tmp_path):
    """bench.py --job on the tiny Qwen2 with random weights: grpo.py's main and, where TRL is installed, TRL's
    GRPOTrainer train the same questions; every completion of every step ran to full length in both (the
    forcing took effect), each step after the first is timed, and grpo.py's peak is predicted beside it."""
    trainers = "grpo,trl" if importlib.util.find_spec("trl") else "grpo"
    L, steps = 5, 3
    args = [os.path.join(HERE, "bench.py"), "--job", "--trainers", trainers, "--model", tiny_qwen, "--random_init"]
    args += ["--dataset", tiny_data, "--steps", str(steps), "--prompts", "2", "--group_size", "2", "--new_tokens"]
    args += [str(L), "--micro_batch_size", "2", "--precision", "fp32", "--device", "cpu", "--job_dir", str(tmp_path)]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for name in trainers.split(","):
        r = summary[name]
        assert r["steps_done"] == steps and not r["timed_out"], r
        assert r["mean_completion_length"] == [L] * steps  # no completion ended early
        assert len(r["step_seconds"]) == steps - 1 and min(r["step_seconds"]) > 0 and r["peak_gib"] > 0
    assert summary["grpo"]["trainer"] == "grpo.py" and summary["predicted_peak_gib"] > 0
    assert os.path.isfile(os.path.join(tmp_path, "grpo-out", "final", "config.json"))  # grpo.py trained and saved
    if "trl" in trainers:
        assert summary["trl"]["trainer"].startswith("TRL ") and summary["trl_over_grpo_step_time"] > 0


# ----------------------------------------------------------------------------- the first GPU run, decided on CPU
@pytest.fixture(autouse=True)
def restore_fp32_precision():
    """setup_cuda sets torch's fp32 matmul precision, a process-wide flag: each test gets it back as it found it.
    Not monkeypatch: the flag lives in no instance __dict__ (cuBLASModule reads and writes it through __getattr__
    and __setattr__), and pytest >= 9.2 undoes such an attribute with delattr, which cuBLASModule refuses."""
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def fake_cuda(monkeypatch, capability=(9, 0), gpus: int = 2) -> list:
    """The CUDA calls grpo.py makes, mocked as strictly as torch: a CPU test then runs the CUDA decisions. Each
    mock refuses what the real call refuses (a lax set_device once hid a crash on --device cuda): set_device is
    torch's own, down to the C call that would reach the driver, so its argument checks run; the device index
    checks are torch's (_get_device_index); enable_cudnn_sdp takes a bool only. Returns the calls seen."""
    calls, current = [], [0]

    def set_device_in_driver(index: int) -> None:  # what torch.cuda.set_device calls once its checks pass
        assert type(index) is int and 0 <= index < gpus, index
        current[0] = index
        calls.append(("set_device", torch.device("cuda", index)))

    def get_device_capability(device=None):
        index = current[0] if device is None else torch.cuda._utils._get_device_index(device, optional=True)
        assert 0 <= index < gpus, index
        return capability

    def enable_cudnn_sdp(on):
        if type(on) is not bool:  # a pybind bool: 0 and 1 are refused
            raise TypeError(f"enable_cudnn_sdp(): expected a bool, got {type(on).__name__}")
        calls.append(("cudnn_sdp", on))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_device_in_driver, raising=False)  # absent in a CPU build
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", enable_cudnn_sdp)
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # torch's own flag: restore_fp32_precision puts it back
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_setup_cuda_makes_every_cuda_setting(monkeypatch):
    """One function holds the CUDA-only settings: expandable segments (unless the user set the allocator), the
    current device, cuDNN attention off (its backward's NaN grad_q, pytorch/pytorch#196678), and TF32 for fp32
    matmuls under bf16 only (then the LM head's alone; --precision fp32 stays exact)."""
    calls = fake_cuda(monkeypatch)
    capability, seen = torch.cuda.get_device_capability, []  # the allocator is set before CUDA is first asked
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d=None: seen.append(os.environ.copy()) or capability(d)
    )
    grpo.setup_cuda(torch.device("cuda", 1), grpo.Config(precision="auto"))
    assert seen and all("expandable_segments" in env.get("PYTORCH_ALLOC_CONF", "") for env in seen)
    assert calls == [("set_device", torch.device("cuda", 1)), ("cudnn_sdp", False)]
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # bf16: the fp32 matmuls are the LM head's
    calls.clear()
    grpo.setup_cuda(torch.device("cuda"), grpo.Config(precision="fp32"))  # no index: the current device, as in torch
    assert calls == [("set_device", torch.device("cuda", 1)), ("cudnn_sdp", False)]
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"  # --precision fp32: every matmul exact
    with pytest.raises(ValueError, match="specified index"):  # the mock refuses what torch refuses
        torch.cuda.set_device(torch.device("cuda"))
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):  # a user's own setting, under either name, wins
        fake_cuda(monkeypatch)
        monkeypatch.setenv(name, "max_split_size_mb:256")
        grpo.setup_cuda(torch.device("cuda", 0), grpo.Config())
        assert os.environ[name] == "max_split_size_mb:256" and "expandable" not in os.environ.get(
            "PYTORCH_ALLOC_CONF", ""
        )


@pytest.mark.parametrize("world", [1, 2])
def test_the_cuda_device_is_set_in_every_process_and_nccl_is_given_it(monkeypatch, world):
    """--device cuda:1 in one process makes cuda:1 the current device (not only under torchrun), and under
    torchrun each rank's GPU goes to init_process_group as device_id."""
    calls = fake_cuda(monkeypatch)
    inits = []
    monkeypatch.setattr(grpo.dist, "is_initialized", lambda: False)

    def init_process_group(backend, device_id=None, **kw):  # torch's own check of device_id (distributed_c10d.py)
        if device_id is not None and (device_id.type != "cuda" or device_id.index is None):
            raise ValueError("Please use a device_id with index.")
        inits.append((backend, {"device_id": device_id, **kw}))

    monkeypatch.setattr(grpo.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(grpo.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(world - 1))
    rank, size, device = grpo.setup_distributed(grpo.Config(device="cuda:1" if world == 1 else "cuda"))
    assert device == torch.device("cuda", 1) and size == world
    assert ("set_device", torch.device("cuda", 1)) in calls and ("cudnn_sdp", False) in calls
    assert inits == ([] if world == 1 else [("nccl", {"device_id": torch.device("cuda", 1)})])


@pytest.mark.parametrize("capability, auto_bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_precision_is_bf16_only_where_attention_takes_it(monkeypatch, capsys, capability, auto_bf16):
    """auto: bf16 from compute capability 8.0 (flash and memory-efficient attention refuse bf16 below it), and the
    device line says which and why; an explicit bf16 below 8.0 runs, with a one-line warning."""
    fake_cuda(monkeypatch, capability)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert grpo.use_bf16(grpo.Config(precision="auto"), cuda) is auto_bf16
    assert grpo.use_bf16(grpo.Config(precision="auto"), cpu) is False
    assert grpo.use_bf16(grpo.Config(plain=True), cuda) is False  # --plain computes in fp32
    assert grpo.describe_precision(grpo.Config(plain=True), cuda) == "fp32 (auto: --plain)"
    assert grpo.use_bf16(grpo.Config(precision="bf16"), cuda) and not grpo.use_bf16(grpo.Config(precision="fp32"), cuda)
    line = grpo.describe_precision(grpo.Config(precision="auto"), cuda)
    assert (
        line.startswith("bf16" if auto_bf16 else "fp32")
        and f"compute capability {capability[0]}.{capability[1]}" in line
    )
    assert capsys.readouterr().err == ""
    grpo.describe_precision(grpo.Config(precision="bf16"), cuda)
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and "--precision fp32" in err) if not auto_bf16 else err == ""


def test_adamw_is_fused_on_every_device(tiny_model):
    """Fused AdamW on CUDA (one kernel, no parameter-sized temporaries: bench.py --memory models it) and on the
    CPU too: the tests train with the implementation a GPU trains with (a foreach step on the CPU hid that LoRA's
    sampler never saw a fused step, which moves no version counter)."""
    model, _ = load(tiny_model)
    for device in (torch.device("cuda"), torch.device("cpu")):
        _, _, optimizer, _ = grpo.setup_training(model, grpo.Config(beta=0), None, 1, device, False)
        assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


def count_host_reads(fn) -> int:
    """count_host_syncs, and every .tolist() (on a GPU a copy to the host; on a CPU it dispatches nothing)."""
    reads = []
    real = torch.Tensor.tolist

    def tolist(self):
        reads.append(1)
        return real(self)

    with mock.patch.object(torch.Tensor, "tolist", tolist):
        return count_host_syncs(fn) + len(reads)


def test_reference_and_update_passes_read_the_host_once_not_per_micro_batch(tiny_qwen):
    """On a GPU each host read stops the CPU from queueing the next micro-batch. The reference pass reads once
    (every micro-batch's length, before the loop) and the update pass twice (the lengths, and the metric sums
    after the loop), however many micro-batches: 8 micro-batches of 1 cost what 1 of 8 costs. Before, about 9 a
    micro-batch (a length, five .item() calls, transformers' padding checks on a 2-D mask)."""
    model, tok = load(tiny_qwen)
    ids, mask, out, lengths, by_env, sample_logp = sampled_batch(model, tok, model, G=4, L=12)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(0))
    model.train()

    def passes(mb: int) -> tuple[int, int]:
        cfg = grpo.Config(micro_batch_size=mb, beta=0.04, max_new_tokens=12)
        ref_logp = grpo.frozen_logprobs(model, ids, mask, out, lengths, mb, 1.0)
        update = (model, ids, mask, out, lengths, by_env, adv, sample_logp, ref_logp, cfg, mb)
        return (
            count_host_reads(lambda: grpo.frozen_logprobs(model, ids, mask, out, lengths, mb, 1.0)),
            count_host_reads(lambda: grpo.accumulate_gradients(*update)),
        )

    reads = {mb: passes(mb) for mb in (1, 8)}
    assert reads[1] == reads[8] == (1, 2), reads
    assert sum(reads[1]) / 8 < 1  # per micro-batch


def test_reference_pass_trims_each_micro_batch_to_its_own_longest(tiny_qwen, monkeypatch):
    """pi_ref's pass runs each micro-batch at its own longest completion, as the update pass does, not every one
    at the rollout's longest; the log-probs within each completion's length are those of the untrimmed pass, and
    past its micro-batch's longest 0 (masked by length)."""
    model, tok = load(tiny_qwen)
    ids, mask = prompts_of(tok, ["1+2?", "13+4?"])
    completion = torch.randint(5, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([3, 2, 9, 5])
    real, widths = grpo.token_logprobs, []
    monkeypatch.setattr(
        grpo, "token_logprobs", lambda m, p, pm, c, *a: widths.append(c.shape[1]) or real(m, p, pm, c, *a)
    )
    trimmed = grpo.frozen_logprobs(model, ids, mask, completion, lengths, 2, 1.0)
    assert widths == [3, 9]
    full = grpo.frozen_logprobs(model, ids, mask, completion, torch.full((4,), 9), 4, 1.0)
    within = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.allclose(trimmed[within], full[within], atol=1e-5) and (trimmed[:2, 3:] == 0).all()


def test_padding_rows_see_themselves_and_real_rows_match_a_2d_mask(tiny_qwen):
    """The 4-D masks grpo.py builds (transformers takes them as is, with no host check) give the real tokens the
    same log-probs as transformers' own mask from the 2-D one, and every query has something to attend to."""
    model, tok = load(tiny_qwen)
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    keep = grpo.causal_keep(mask, ids.shape[1])
    assert keep.any(-1).all()  # no row of nothing: left padding sees itself
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=grpo.attention_mask_4d(keep, model)).logits
        theirs = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_out_of_memory_in_evaluation_names_the_eval_batch_size(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    """An OOM while evaluating stops with one line that names --eval_batch_size, after the step's checkpoint
    was written, so --resume goes on from there. Evaluation shows its progress on stderr."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=2, save_every=1, eval_every=2, eval_batch_size=2)
    real = grpo.generate

    def generate(sampler, tok, questions, group_size, temperature, cfg_, device, rows=None):
        if temperature == 0 and generate.training_steps >= 2:  # the evaluation after step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        generate.training_steps += temperature > 0
        return real(sampler, tok, questions, group_size, temperature, cfg_, device, rows)

    generate.training_steps = 0
    monkeypatch.setattr(grpo, "generate", generate)
    with pytest.raises(SystemExit) as e:
        grpo.main(cfg)
    message = str(e.value)
    assert "\n" not in message and "evaluating at step 2" in message and "--eval_batch_size (now 2)" in message
    assert "eval 0" in capsys.readouterr().err  # the evaluation's progress bar
    monkeypatch.setattr(grpo, "generate", real)
    grpo.main(dataclasses_replace(cfg, resume=True, steps=2))  # the step-1 checkpoint is intact: step 2 again
    assert [r["step"] for r in read_metrics(cfg) if "reward" in r] == [1, 2]


def test_a_gpu_sized_job_on_a_cpu_says_so_before_loading(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    """On a CPU, a job that would take minutes per step says so in one line, with the estimate and the tiny CPU
    run, before the weights are loaded; the run itself is what the user asked for. A small job says nothing."""
    cfg = tiny_config(tiny_model, tiny_data, tmp_path)
    grpo.warn_if_slow_on_cpu(cfg, tiny_model, torch.device("cpu"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(grpo, "CPU_SECONDS_PER_PARAM_TOKEN", 1.0)  # the tiny model as slow as a big one

    def load_model(*args):
        raise RuntimeError("loaded")

    monkeypatch.setattr(grpo, "load_model", load_model)
    with pytest.raises(RuntimeError, match="loaded"):
        grpo.main(cfg)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: this job is sized for a GPU")]
    assert len(warning) == 1 and f"{cfg.steps} steps" in warning[0] and "--device cpu --steps 10" in warning[0]
    grpo.warn_if_slow_on_cpu(dataclasses.replace(cfg, eval_only=True), tiny_model, torch.device("cpu"))
    assert capsys.readouterr().err == ""  # --eval_only trains no step: nothing to warn of
    if os.environ.get("GRPO_TEST_MODEL"):  # the real numbers: the default job warns, the README's tiny run does not
        monkeypatch.setattr(grpo, "CPU_SECONDS_PER_PARAM_TOKEN", 1.6e-10)
        grpo.warn_if_slow_on_cpu(grpo.Config(), os.environ["GRPO_TEST_MODEL"], torch.device("cpu"))
        tiny_run = grpo.Config(prompts_per_step=2, group_size=4, max_new_tokens=64)
        grpo.warn_if_slow_on_cpu(tiny_run, os.environ["GRPO_TEST_MODEL"], torch.device("cpu"))
        grpo.warn_if_slow_on_cpu(grpo.Config(), os.environ["GRPO_TEST_MODEL"], torch.device("cuda"))  # not a CPU
        assert capsys.readouterr().err.count("sized for a GPU") == 1


def test_the_allocator_reading_on_a_gpu_mocked(monkeypatch):
    """bench.py's allocator label on CUDA (never run on a CPU): the settings are read after a first allocation, from
    the snapshot's segments, whose key CUDA's snapshot writes as segmentDict[is_expandable_s] (torch/csrc/cuda/
    Module.cpp); under cudaMallocAsync no segment is the caching allocator's, so none is read. The mocks refuse a
    read before the first CUDA allocation, as the label would then report what the allocator has not yet parsed."""
    bench = importlib.import_module("bench")
    allocated, empty = [], torch.empty

    def cuda_empty(*size, device=None, **kw):
        assert torch.device(device).type == "cuda"
        allocated.append(size)
        return empty(*size, **kw)

    def read(value):
        def reader(*args):
            assert allocated, "read before the first CUDA allocation"
            return value

        return reader

    monkeypatch.setattr(torch, "empty", cuda_empty)
    for backend, segments, said in [
        ("native", [{"is_expandable": False}, {"is_expandable": True}], "native, expandable segments on"),
        ("native", [{"is_expandable": False}], "native, expandable segments off"),
        ("cudaMallocAsync", None, "cudaMallocAsync"),
    ]:
        allocated.clear()
        monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", read(backend))
        monkeypatch.setattr(torch.cuda.memory, "_snapshot", read({"segments": segments}) if segments else None)
        assert bench.allocator_in_effect(torch.device("cuda")).startswith(said) and allocated == [(1,)]


def test_bench_gpu_checks_run_on_cpu(tiny_qwen):
    """.ci/gpu's new parts, on CPU: the attention NaN check (torch's backends, then grpo.py's setting; it fails
    only on grpo.py's), the decode profile, and the job's stop on a skipped update or a non-finite metric."""
    bench = importlib.import_module("bench")
    run = [sys.executable, os.path.join(HERE, "bench.py"), "--model", tiny_qwen, "--device", "cpu"]
    result = subprocess.run([*run, "--sdpa_check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    check = json.loads(result.stdout.strip().splitlines()[-1])
    assert check["keys"] % 128 == 64 and check["non_finite_grad_q_grpo"] == 0
    args = ["--decode_profile", "--prompts", "2", "--group_size", "2", "--prompt_len", "12"]
    result = subprocess.run([*run, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["decode_ms_per_step"] > 0
    args = ["--cuda_checks", "--prompts", "2", "--group_size", "2", "--prompt_len", "12", "--new_tokens", "6"]
    result = subprocess.run([*run, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])
    assert checks["forced_kernel"] == "MATH" and checks["logprobs_finite"] and checks["gradients_finite"]
    bench.check_job_step(1, {"skipped_updates": 0.0, "loss": 0.5})
    for metrics in ({"skipped_updates": 1.0, "loss": 0.5}, {"skipped_updates": 0.0, "loss": float("nan")}):
        with pytest.raises(SystemExit, match="step 3"):
            bench.check_job_step(3, metrics)


def test_a_decode_token_dispatches_at_most_1900_ops_and_lora_at_most_1_5x(tiny_qwen):
    """On a GPU the host launches every op of a decode token one by one (~5-10 us each), against ~1.3 ms of GPU work
    per token for Qwen2.5-0.5B: the op count bounds decoding. Counted on the tiny Qwen2 with 1 and 2 layers (each
    layer dispatches the same ops, whatever its width), so the 24-layer count is fixed + 24 x per layer: at most
    1,900 for full fine-tuning (it was 1,968: SDPA turned the boolean mask into an additive one in every layer), and
    LoRA at most 1.5x that (it was 2.02x: the adapters were cast in every layer at every token)."""
    from transformers import AutoConfig

    bench = importlib.import_module("bench")
    config = AutoConfig.from_pretrained(tiny_qwen)
    counts = []
    for layers in (1, 2):
        config.num_hidden_layers = layers
        counts.append(bench.decode_ops(config, lora_rank=4))
    at_24 = {k: 2 * counts[0][k] - counts[1][k] + 24 * (counts[1][k] - counts[0][k]) for k in ("full", "lora")}
    assert at_24["full"] <= 1900 and at_24["lora"] <= 1.5 * at_24["full"], at_24


def test_kernel_seconds_counts_each_kernel_once():
    """The GPU's busy time from a profile: key_averages() lists a launching op (a CPU row whose self device time
    is its kernels') and the kernel itself (a CUDA row); only the device rows count, or every kernel counts twice
    and the host-bound share comes out wrong, even negative. A user annotation's range is not a kernel either."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = importlib.import_module("bench")

    def row(device, us, note=False):
        return SimpleNamespace(device_type=device, self_device_time_total=us, is_user_annotation=note)

    events = [row(DeviceType.CPU, 300.0), row(DeviceType.CUDA, 300.0), row(DeviceType.CPU, 200.0),
              row(DeviceType.CUDA, 200.0), row(DeviceType.CPU, 0.0), row(DeviceType.CUDA, 1000.0, note=True)]  # fmt: skip
    assert bench.kernel_seconds(events) == pytest.approx(500e-6)


def test_every_bench_part_on_cuda_starts_with_grpos_cuda_settings(monkeypatch):
    """Each bench.py part that runs on CUDA calls grpo.setup_cuda before anything else (its first CUDA
    allocation included): the phase table's fast and plain paths, TRL's job, the decode profile and the CUDA
    checks then run with cuDNN attention off and the allocator grpo.py trains with, so their figures compare like
    with like. (grpo.py's own job sets them in main.) Stopped at the call: nothing else runs."""
    bench = importlib.import_module("bench")

    class SetUp(Exception):
        pass

    def setup_cuda(device, cfg):
        raise SetUp(device)

    monkeypatch.setattr(grpo, "setup_cuda", setup_cuda)
    args = argparse.Namespace(device="cuda", precision="auto")  # a part that read more first would fail on it
    for part in (bench.run_path, bench.run_trl_job, bench.decode_profile, bench.cuda_checks):
        with pytest.raises(SetUp):
            part(args)


# ----------------------------------------------------------------------------- LoRA
def lora_model(path: str, rank: int = 4, bf16: bool = False):
    """The model at path with rank-`rank` adapters (B = 0, as at the start), and its tokenizer."""
    model, tok = load(path)
    if bf16:  # as load_model leaves a LoRA base under bf16
        grpo.bf16_weights(model)
    grpo.add_lora(model, grpo.Config(lora_rank=rank), None)
    return model, tok


def some_logprobs(model, tok, G: int = 2, L: int = 6):
    """token_logprobs (B, L) of fixed completions of two prompts (no sampling: the same inputs for every model)."""
    ids, mask = prompts_of(tok, ["1+2?", "13+4?"])
    completion = torch.randint(5, 90, (ids.shape[0] * G, L), generator=torch.Generator().manual_seed(0))
    index = torch.arange(ids.shape[0] * G) // G
    ids, mask, completion, index = (t.to(model.device) for t in (ids, mask, completion, index))
    return grpo.token_logprobs(model, ids, mask, completion, index, 1.0)


def test_lora_adapters_off_is_the_base_model_exactly(tiny_qwen):
    """At the start (B = 0) the policy is the base model, bit for bit; with trained (nonzero) adapters it is
    not, and with its adapters off (pi_ref, frozen_logprobs) it is the base model again, bit for bit."""
    base, tok = load(tiny_qwen)
    model, _ = lora_model(tiny_qwen)
    expected = some_logprobs(base, tok)
    assert len(grpo.lora_layers(model)) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks; no LM head
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert torch.equal(some_logprobs(model, tok), expected)  # policy == reference at the start
    with torch.no_grad():
        for layer in grpo.lora_layers(model):
            layer.lora_B.normal_(0, 0.5)
    assert (some_logprobs(model, tok) - expected).abs().max() > 1e-3  # the adapters do change the policy
    with grpo.adapters_off(model):
        assert torch.equal(some_logprobs(model, tok), expected)
    ids, mask = prompts_of(tok, ["1+2?", "13+4?"])
    completion = torch.randint(5, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((4,), 6)
    assert torch.equal(grpo.frozen_logprobs(model, ids, mask, completion, lengths, 4, 1.0), expected)  # adapters off
    assert (some_logprobs(model, tok) - expected).abs().max() > 1e-3  # and on again after


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_sampling_adds_the_same_update_and_never_a_stale_one(tiny_qwen, bf16):
    """Within a rollout (sampling_adapters) an adapted layer adds (alpha / r) B A x with A and B cast once, in place:
    the same output as the training path (to rounding in bf16). The casts are made at each rollout's start and
    dropped at its end, so after an update of A or B made as fused AdamW makes it (in place, no version counter
    moved) the next rollout adds the new adapters; outside a rollout no cast is left to go stale."""
    model, tok = lora_model(tiny_qwen, bf16=bf16)
    model, layer = model.to(DEVICE), grpo.lora_layers(model)[0]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x = x.to(torch.bfloat16) if bf16 else x
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-6, atol=1e-6)
    for update in range(3):
        for p in (layer.lora_A, layer.lora_B):  # as a fused step writes it: behind the version counter's back
            version = p._version
            p.data += 0.1 * torch.randn_like(p) if update != 1 or p is layer.lora_A else 0
            assert p._version == version
        with torch.no_grad(), grpo.sampling_adapters(model):
            assert "lora_cast" in layer.__dict__
            sampled = layer(x)
        assert "lora_cast" not in layer.__dict__
        trained = layer(x).detach()  # the differentiable path
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(sampled, trained, **tol), update
        assert not torch.allclose(trained, base, **tol)  # the adapters add something: the comparison can fail


def test_lora_bf16_base_and_the_policy_samples(tiny_qwen, tiny_data, tmp_path):
    """--precision bf16 with LoRA (the GPU path, on CPU): frozen weights bf16, adapters and their AdamW state
    fp32, rotary buffers fp32, no sampler copy and no reference copy: both are the policy."""
    cfg = tiny_config(tiny_qwen, tiny_data, tmp_path, lora_rank=4, precision="bf16", eval_size=0)
    model, tok = grpo.load_model(tiny_qwen, cfg, torch.device("cpu"))  # as main loads it: the base in bf16
    policy, ref, optimizer, _ = grpo.setup_training(model, cfg, None, 1, torch.device("cpu"), True)
    assert ref is model and policy is model
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    rows = [{"question": "1+2?", "gold": "3"}, {"question": "3+4?", "gold": "7"}]
    sums, applied, _, _ = grpo.grpo_step(policy, model, ref, tok, optimizer, rows, cfg)
    assert applied == [True] and math.isfinite(sums["loss"][0])
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values() if t.ndim)
    assert {id(p) for p in optimizer.state} == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert optimizer.param_groups[0]["initial_lr"] == cfg.lora_lr != cfg.lr  # the adapters' rate, not --lr


def test_main_with_lora_under_bf16_samples_from_the_policy(tiny_qwen, tiny_data, tmp_path, monkeypatch):
    """--lora_rank under bf16 (a GPU's default) through main: no bf16 sampler copy is made (a copy of the base
    would lack the adapters); the policy itself, adapters on, samples every rollout."""
    samplers, generate = [], grpo.generate  # each rollout's sampler, and whether it had adapters then
    monkeypatch.setattr(grpo, "generate", lambda sampler, *a: samplers.append((sampler, bool(grpo.lora_layers(sampler))))
                        or generate(sampler, *a))  # fmt: skip
    monkeypatch.setattr(grpo, "plot_metrics", lambda output_dir: None)
    models = []
    cfg = tiny_config(tiny_qwen, tiny_data, tmp_path, lora_rank=4, precision="bf16", steps=1, eval_size=0)
    grpo.main(cfg, on_step=lambda step, model, metrics, sums: models.append(model))
    assert samplers == [(models[0], True)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_step_changes_only_the_adapters(tiny_model, tiny_data, tmp_path, monkeypatch, checkpointing):
    """One GRPO step with LoRA: only A and B get gradients, and B moves away from 0; every base weight
    is untouched; the KL of the first step is exactly 0 (policy == reference); gradient checkpointing too."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)])  # weights move
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, lora_rank=4, gradient_checkpointing=checkpointing)
    model, tok = load(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, ref, optimizer, _ = grpo.setup_training(model, cfg, None, 1, torch.device("cpu"), False)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    grads = {}
    step = optimizer.step

    def record_then_step():  # the gradients as the optimizer sees them
        grads.update({n: p.grad for n, p in model.named_parameters()})
        step()

    monkeypatch.setattr(optimizer, "step", record_then_step)
    rows = [{"question": "1+2?", "gold": "3"}, {"question": "3+4?", "gold": "7"}]
    sums, applied, _, rewards = grpo.grpo_step(policy, model, ref, tok, optimizer, rows, cfg)
    assert applied == [True] and rewards.std() > 0 and sums["kl"][0] == 0.0
    assert model.is_activation_checkpointing == checkpointing
    for name, p in model.named_parameters():
        if ".lora_" in name:  # with B = 0, A's gradient B^T (..) is 0 at the first step: only B moves
            assert grads[name] is not None and (grads[name].abs().sum() > 0) == (".lora_B" in name), name
        else:
            assert grads[name] is None and torch.equal(p, before[name]), name
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if ".lora_B" in n)


def test_lora_main_saves_adapters_and_a_merged_final_model(tiny_model, tiny_data, tmp_path, monkeypatch):
    """main with LoRA: checkpoint/ holds the adapters and trainer state (no base weights), adapters/ the
    adapters alone, and final/ a plain model that from_pretrained loads, whose log-probs equal the trained
    policy's to 1e-5 (merging W + s B A rounds differently from W x + s B (A x), in fp32); --eval_only on it
    writes the completions the run's own last evaluation wrote (its sampler saw every update: fused AdamW, which
    every device uses, moves no version counter, so a cast cached on them went stale), not the base model's.
    On GRPO_TEST_DEVICE (.ci/gpu runs it on CUDA, whose fused AdamW kernel is the one every GPU LoRA run steps
    with), in fp32 on every device: a bf16 merge rounds W + s B A to 8 bits, which may turn a greedy near-tie,
    and then equal completions would test the rounding, not the sampler."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)])
    fused, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: fused.append(k.get("fused")) or adamw(*a, **k))
    on_device = dict(device=str(DEVICE), precision="fp32")
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, lora_rank=4, lora_alpha=8.0, save_every=2, eval_size=6,
                      lr=0.1, max_new_tokens=12, **on_device)  # fmt: skip
    policy_logp = {}

    def on_step(step, model, metrics, sums):
        if step == cfg.steps:
            with torch.no_grad():
                policy_logp["last"] = some_logprobs(model.eval(), load(tiny_model)[1])

    grpo.main(cfg, on_step=on_step)
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "checkpoint")) == sorted(["adapters.safetensors", "trainer_state.pt"] +
                                                             [f for f in os.listdir(out / "adapters") if f != "adapters.safetensors"])  # fmt: skip
    assert not glob.glob(str(out / "checkpoint" / "model*.safetensors"))
    size = os.path.getsize(out / "adapters" / "adapters.safetensors")
    assert size < 0.25 * os.path.getsize(out / "final" / "model.safetensors")
    final, tok = load(str(out / "final"))
    assert not [n for n, _ in final.named_parameters() if "lora" in n]
    assert not torch.equal(
        final.model.layers[0].self_attn.q_proj.weight, load(tiny_model)[0].model.layers[0].self_attn.q_proj.weight
    )
    torch.testing.assert_close(some_logprobs(final.to(DEVICE), tok), policy_logp["last"], rtol=0, atol=1e-5)
    evaluated = tiny_config(
        str(out / "final"), tiny_data, tmp_path / "e", eval_only=True, eval_size=6, max_new_tokens=12, **on_device
    )
    grpo.main(evaluated)
    assert read_evaluation(evaluated.output_dir)["problems"] == 6 and fused == [True]

    def completions(path):
        with open(path) as f:
            return [json.loads(line)["completion"] for line in f]

    base, last = completions(out / "eval_0.jsonl"), completions(out / f"eval_{cfg.steps}.jsonl")
    assert last == completions(tmp_path / "e" / "out" / "evaluation.jsonl")
    assert sum(a != b for a, b in zip(base, last)) >= 3, (base, last)  # the adapters moved the greedy answers


def test_lora_resume_is_bit_exact(tiny_model, tiny_data, tmp_path, monkeypatch):
    """A LoRA run interrupted mid-step and resumed from its adapters + AdamW state ends bit-identical to an
    uninterrupted one: the merged final weights and every logged metric. Under bf16, as a GPU runs it."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)])
    common = dict(steps=4, save_every=2, eval_size=0, mu=2, lr=3e-3, warmup_steps=3, lora_rank=4, precision="bf16")
    full = tiny_config(tiny_model, tiny_data, tmp_path / "a", **common)
    grpo.main(full)

    def crash(step, *args):
        if step == 3:
            raise KeyboardInterrupt

    part = tiny_config(tiny_model, tiny_data, tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):
        grpo.main(part, on_step=crash)
    grpo.main(dataclasses_replace(part, resume=True))
    a, b = params_of(os.path.join(full.output_dir, "final")), params_of(os.path.join(part.output_dir, "final"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, params_of(tiny_model)))  # and training changed the model
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(part))


def test_lora_bad_input(tiny_model, tiny_data, tmp_path):
    """One line and a non-zero exit: a negative rank, --lr with a rank (or --lora_lr without), a non-positive alpha,
    --eval_only with adapters, a model with no linear layers, and --resume with another rank (or a full fine-tuning
    run with a rank)."""
    assert_one_line_error(run_cli("--model", tiny_model, "--lora_rank", "-1", "--device", "cpu"), "--lora_rank -1")
    lr = run_cli("--model", tiny_model, "--lora_rank", "16", "--lr", "1e-4", "--device", "cpu")
    assert_one_line_error(lr, "with --lora_rank pass --lora_lr")  # one rate per run, named by what it trains
    assert_one_line_error(run_cli("--model", tiny_model, "--lora_lr", "1e-4", "--device", "cpu"), "--lora_rank is 0")
    for kw, words in [(dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha 0.0"),
                      (dict(lora_rank=4, eval_only=True), "--eval_only")]:  # fmt: skip
        with pytest.raises(SystemExit, match=words):
            grpo.main(tiny_config(tiny_model, tiny_data, tmp_path, **kw))
    from transformers import GPT2Config, GPT2LMHeadModel  # attention and MLP are Conv1D layers, not nn.Linear

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(SystemExit, match="no torch.nn.Linear layers") as e:
        grpo.add_lora(gpt2, grpo.Config(lora_rank=4), None)
    assert "\n" not in str(e.value)
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, lora_rank=4, save_every=1, eval_size=0, steps=1)
    grpo.main(cfg)
    with pytest.raises(SystemExit, match="--resume with --lora_rank 8: .* trained with --lora_rank 4"):
        grpo.main(dataclasses_replace(cfg, resume=True, steps=2, lora_rank=8))
    with pytest.raises(SystemExit, match="--resume with --lora_rank 0: .* trained with --lora_rank 4"):  # given: 0
        grpo.read_checkpoint(dataclasses_replace(cfg, resume=True, steps=2, lora_rank=0), {"resume", "lora_rank"})
    with pytest.raises(SystemExit, match="--lora_alpha 16.0: .* trained with --lora_alpha 32.0"):
        grpo.main(dataclasses_replace(cfg, resume=True, steps=2, lora_alpha=16.0))
    grpo.main(dataclasses_replace(cfg, resume=True, steps=2))  # the same rank resumes
    plain = tiny_config(tiny_model, tiny_data, tmp_path / "full", save_every=1, eval_size=0, steps=1)
    grpo.main(plain)
    with pytest.raises(SystemExit, match="--resume with --lora_rank 4: .* trained with --lora_rank 0"):
        grpo.main(dataclasses_replace(plain, resume=True, steps=2, lora_rank=4))


def test_lora_distributed_two_processes(tiny_model, tiny_data, tmp_path):
    """torchrun, 2 ranks, LoRA under bf16 (as a GPU runs it): DDP averages the adapters' gradients only; the weights
    are the same on both ranks after every step, and rank 0 saves the adapters and the merged model."""
    script = tmp_path / "ddp_run.py"
    shorter = "def shorter_is_better(completion, answer, **kwargs):\n    return 1.0 / (1 + len(completion))\n"
    shorter += "grpo.REWARD_FUNCS = grpo.REWARD_FUNCS + [(shorter_is_better, 1.0)]  # weights move\n"
    script.write_text(DDP_SCRIPT.format(here=HERE).replace("grpo.main(cfg,", shorter + "grpo.main(cfg,"))
    cfg = dataclasses_asdict(tiny_config(tiny_model, tiny_data, tmp_path, steps=2, prompts_per_step=4, eval_size=2,
                                         save_every=2, lora_rank=4, lr=1e-2, precision="bf16"))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(cfg)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
    assert_process_group_gone(tmp_path / "out")
    ranks = [json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in range(2)]
    assert [r["step"] for r in ranks[0]] == [1, 2] and all(r["same"] for rank in ranks for r in rank)
    assert os.path.exists(tmp_path / "out" / "checkpoint" / "adapters.safetensors")
    final = params_of(str(tmp_path / "out" / "final"))
    assert not all(torch.equal(a, b) for a, b in zip(final, params_of(tiny_model)))


def test_bench_memory_with_lora_is_below_full_fine_tuning(tiny_qwen):
    """bench.py --memory --lora_rank on the tiny Qwen2: no sampler or reference copy, gradients and AdamW state
    only for the adapters, and a lower peak than full fine-tuning of the same shape and batch."""
    args = [os.path.join(HERE, "bench.py"), "--memory", "--model", tiny_qwen, "--prompts", "2", "--group_size", "2"]
    args += ["--prompt_len", "16", "--new_tokens", "4", "--micro_batch_size", "2"]
    procs = {rank: subprocess.Popen([sys.executable, *args, "--lora_rank", str(rank)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for rank in (0, 2)}  # fmt: skip
    runs = {}
    for rank, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        runs[rank] = json.loads(out.strip().splitlines()[-1])
    full, lora = runs[0]["breakdown_bytes"], runs[2]["breakdown_bytes"]
    model, _ = lora_model(tiny_qwen, rank=2)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert lora["weights"] == 2 * base + 4 * adapters  # bf16 frozen base, fp32 adapters
    assert lora["sampler"] == 0 and lora["reference"] == 0 and full["sampler"] > 0 and full["reference"] > 0
    assert lora["gradients"] == 4 * adapters  # fp32, and only the adapters
    assert 8 * adapters <= lora["optimizer_state"] <= 8 * adapters + 4 * 28  # exp_avg, exp_avg_sq; a step per tensor
    assert runs[2]["peak_bytes"] < runs[0]["peak_bytes"]
    assert runs[2]["phase_peak_gib"]["setup"] * 2**30 < 4 * base  # the fp32 base never reaches the GPU


def test_a_lora_base_reaches_the_gpu_in_bf16(tiny_qwen, monkeypatch):
    """load_model with LoRA under bf16 casts the frozen weights on the host: the GPU never holds them in fp32
    (a 7B base is 28 GiB in fp32). Full fine-tuning moves fp32 master weights. CUDA mocked."""
    fake_cuda(monkeypatch)
    moved = []  # the parameters' dtypes each time a whole model is moved to the GPU
    to = torch.nn.Module.to
    monkeypatch.setattr(
        torch.nn.Module,
        "to",
        lambda self, *a, **k: (
            moved.append({p.dtype for p in self.parameters()}) or self
            if a and str(a[0]).startswith("cuda")
            else to(self, *a, **k)
        ),
    )
    for rank, dtype in ((4, torch.bfloat16), (0, torch.float32)):
        moved.clear()
        model, _ = grpo.load_model(tiny_qwen, grpo.Config(lora_rank=rank, precision="bf16"), torch.device("cuda"))
        assert moved == [{dtype}], (rank, moved)
        assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())  # rotary stays fp32


# ----------------------------------------------------------------------------- the plain forms above the END line
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fast_logprobs_equal_the_plain_ones_with_gradients(tiny_qwen, attention):
    """token_logprobs (each prompt once, its cache shared, an fp32 head a chunk at a time) computes what
    sequence_logprobs (the whole sequences, logits -> log_softmax -> gather) does: values and gradients, with
    left padding, under bf16 autocast too (the CUDA path; bf16 rounding bounds the difference there). With eager
    attention too, which takes the 4-D mask as an additive one (attention_mask_4d)."""
    model, tok = load(tiny_qwen, attention)
    model.train()
    ids, mask = prompts_of(tok, ["1+1?", "what is 12 + 30?"])
    completion = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    weights = torch.linspace(-1, 1, completion.numel()).view(completion.shape)
    model, ids, mask, completion, weights = to_device(model, ids, mask, completion, weights)
    for bf16, atol in ((False, 1e-5), (True, 3e-2)):
        results = []
        for fn in (grpo.sequence_logprobs, grpo.token_logprobs):
            index = torch.arange(6, device=DEVICE) // 3
            args = (model, ids, mask, completion) + ((index,) if fn is grpo.token_logprobs else ())
            with grpo.autocast(DEVICE, bf16):
                logp = fn(*args, 0.7)
            (grad,) = torch.autograd.grad((logp * weights).sum(), model.model.layers[0].self_attn.q_proj.weight)
            results.append((logp.detach(), grad))
        (plain, plain_grad), (fast, fast_grad) = results
        assert plain.dtype == fast.dtype == torch.float32 and plain.shape == fast.shape == (6, 7)
        assert torch.allclose(plain, fast, atol=atol), (bf16, (plain - fast).abs().max())
        assert torch.allclose(plain_grad, fast_grad, atol=atol * 10, rtol=0.05), bf16


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fast_rollout_equals_the_plain_one(tiny_qwen, attention):
    """rollout (a shared prefill, a KV cache, 4-D masks) against sample_plainly (the whole sequence through the
    model every token): both draw by the same exponential race, one (B, V) noise per token in the same order, so
    from the same seed they return the same tokens, lengths, ended and by_env, and log-probs equal within float
    noise (both those of what they drew: sequence_logprobs), greedy, sampled, and with an environment writing;
    under sdpa and eager attention (which adds its masks to the scores)."""
    model, tok = load(tiny_qwen, attention)
    model, (ids, mask) = model.to(DEVICE), to_device(*prompts_of(tok, ["1+1?", "what is 12 + 30?"]))
    eos = grpo.eos_ids(model, tok)
    for T, env, n in ((0.0, None, 12), (0.8, None, 10), (0.8, frequent_env(tok, 2), 40)):
        outs = []
        for fn in (grpo.rollout, grpo.sample_plainly):
            torch.manual_seed(0)
            outs.append(fn(model, ids, mask, 3, n, T, eos, tok.pad_token_id, env=env))
        (completion, lengths, ended, fast_logp, by_env), plain = outs
        for fast_part, plain_part in zip((completion, lengths, ended, by_env), plain[:3] + plain[4:]):
            assert torch.equal(fast_part, plain_part), T
        m = grpo.completion_mask(lengths, completion.shape[1], by_env).bool()
        with torch.no_grad():
            logp = grpo.sequence_logprobs(model, ids, mask, completion, T or 1.0)
        assert m.sum() > 6 and torch.allclose(fast_logp[m], plain[3][m], atol=1e-5)
        assert torch.allclose(fast_logp[m], logp[m], atol=1e-4)
    assert by_env.any()  # the environment wrote


def test_exponential_race_draws_from_the_softmax():
    """sample's argmax(p / q), q ~ Exponential(1), is an exact draw from p = softmax(logits / T): the
    frequencies of 200,000 draws match p within 4 standard errors, at two temperatures; T = 0 is argmax."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    torch.manual_seed(0)
    for T in (1.0, 0.5):
        token, logp = grpo.sample(logits.expand(200_000, -1), T)
        p = torch.softmax(logits / T, -1)
        freq = torch.bincount(token, minlength=5).float() / 200_000
        assert ((freq - p).abs() <= 4 * (p * (1 - p) / 200_000).sqrt() + 1e-9).all(), (T, freq, p)
        assert torch.allclose(logp, p.log()[token])
    assert grpo.sample(logits[None], 0.0)[0].item() == 0


def test_generate_returns_a_rollout_with_named_shapes(tiny_model):
    model, tok = load(tiny_model)
    cfg = grpo.Config(max_new_tokens=6)
    ro = grpo.generate(model, tok, ["1+1?", "2+2?", "3+3?"], 2, 1.0, cfg, torch.device("cpu"))
    assert isinstance(ro, grpo.Rollout)
    N, P = ro.prompt_ids.shape
    B, L = ro.completion_ids.shape
    assert (N, B) == (3, 6) and ro.prompt_mask.shape == (N, P) and L <= 6
    assert ro.lengths.shape == ro.ended.shape == (B,) and ro.sample_logp.shape == ro.by_env.shape == (B, L)
    assert len(ro.texts) == B and not ro.by_env.any()


def test_rewards_receive_the_token_count_and_the_question(tiny_model, tiny_data, tmp_path, monkeypatch):
    """A reward function gets, as keywords, the completion's own token count and --max_new_tokens (a length
    penalty needs nothing else) and the question; a reward written with only **kwargs keeps working."""
    seen = []

    def length_penalty(completion: str, answer: str, tokens: int, max_tokens: int, question: str, **kwargs) -> float:
        seen.append((tokens, max_tokens, question))
        return -tokens / max_tokens

    monkeypatch.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(length_penalty, 1.0)])
    steps = []
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=1)
    grpo.main(cfg, on_step=lambda step, model, metrics, sums: steps.append(sums))
    B = cfg.prompts_per_step * cfg.group_size
    assert len(seen) == B and all(m == cfg.max_new_tokens and 1 <= t <= m and q for t, m, q in seen)
    assert sum(t for t, _, _ in seen) == steps[0]["completion_len"][0]  # the tokens the model wrote, summed
    assert math.isclose(steps[0]["reward/length_penalty"][0], -sum(t for t, _, _ in seen) / cfg.max_new_tokens)


def test_every_reward_gets_every_keyword_it_declares_from_every_caller(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Rewards get what they declare: each entry of REWARD_FUNCS and TOOL_REWARD_FUNCS, and the README's length
    penalty (tokens, max_tokens and question, no defaults), is called with every keyword it takes (a default left
    unfilled counts as missing) by every caller: training's score (main with --tools), and bench.py's adapter
    for TRL's GRPOTrainer (trl_reward, called as TRL calls a reward function)."""
    import bench

    calls = []

    def cut_off_penalty(completion: str, answer: str, tokens: int, max_tokens: int, question: str, **kwargs) -> float:
        return -float(tokens >= max_tokens)

    def checked(fn, caller):
        params = list(inspect.signature(fn).parameters.values())[2:]
        declared = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

        @functools.wraps(fn)
        def called(completion, answer, **kwargs):
            missing = [name for name in declared + ["question", "tokens", "max_tokens"] if name not in kwargs]
            calls.append((caller, fn.__name__, missing))
            return fn(completion, answer, **kwargs)

        return called

    rewards, tool_rewards = grpo.REWARD_FUNCS + [(cut_off_penalty, 0.5)], grpo.TOOL_REWARD_FUNCS
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(checked(fn, "score"), w) for fn, w in rewards])
    monkeypatch.setattr(grpo, "TOOL_REWARD_FUNCS", [(checked(fn, "score"), w) for fn, w in tool_rewards])
    grpo.main(tiny_config(tiny_model, tiny_data, tmp_path, steps=1, tools="calculator"))
    for fn, _ in rewards + tool_rewards:
        trl = bench.trl_reward(checked(fn, "trl"), 64)
        paid = trl(prompts=["p"], completions=[HONEST], completion_ids=[[5] * 64], gold=["29842"], question=[CRATES],
                   trainer_state=None)  # fmt: skip
        assert paid == [fn(HONEST, "29842", question=CRATES, tokens=64, max_tokens=64)]
    names = {fn.__name__ for fn, _ in rewards + tool_rewards}
    assert {(caller, name) for caller, name, _ in calls} == {(c, n) for c in ("score", "trl") for n in names}
    assert [call for call in calls if call[2]] == []


def test_a_config_field_without_a_help_comment_gets_its_name_as_help(monkeypatch, capsys):
    @dataclasses.dataclass
    class Extended(grpo.Config):
        new_knob: int = 3

    monkeypatch.setattr(grpo, "Config", Extended)
    cfg, given = grpo.parse_config(["--new_knob", "5", "--steps", "2"])
    assert cfg.new_knob == 5 and cfg.steps == 2 and given == {"new_knob", "steps"}
    with pytest.raises(SystemExit):
        grpo.parse_config(["--help"])
    assert "new_knob (default: 3)" in capsys.readouterr().out


def test_adamw_betas_come_from_the_config(tiny_model):
    model, _ = load(tiny_model)
    cfg = grpo.Config(beta=0, adam_beta1=0.8, adam_beta2=0.95)
    _, _, optimizer, _ = grpo.setup_training(model, cfg, None, 1, torch.device("cpu"), False)
    assert optimizer.defaults["betas"] == (0.8, 0.95)


def test_a_first_reading_ends_by_line_500():
    """The file is a textbook: the END OF THE ALGORITHM line about line 500 (as the README says; by 520, so that a
    fork's first reward or two fail nothing for moving lines), with the objective, the step, the plain forms and
    main above it, the fast paths below, and no function longer than 80 lines."""
    with open(grpo.__file__) as f:
        source = f.read()
    lines = source.splitlines()
    end = next(i + 1 for i, line in enumerate(lines) if line.startswith("# ===") and "END OF THE ALGORITHM" in line)
    assert end <= 520, end
    where = {node.name: node.lineno for node in ast.parse(source).body if hasattr(node, "name")}
    above = ["Config", "grpo_loss", "grpo_step", "paths", "plain_update", "plain_reference_logprobs", "Rollout"]
    above += ["sample_plainly", "sequence_logprobs", "main", "setup_training"]
    assert all(where[name] < end for name in above), {name: where[name] for name in above}
    below = ["rollout", "token_logprobs", "sample", "bf16_copy", "head_logprobs", "accumulate_gradients", "fast_update"]
    assert all(where[name] > end for name in below)
    longest = max(
        (n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
    )
    assert longest[0] <= 80, longest
    with open(os.path.join(HERE, "README.md")) as f:
        assert f"END OF THE ALGORITHM line, about line {round(end, -2)}**" in f.read()


def module_names(node) -> set[str]:
    """The module-level names a statement of grpo.py defines: a function's, a class's, an assignment's targets."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name)}
    return {node.name} if hasattr(node, "name") else set()


def test_the_glossary_names_every_name_the_first_reading_uses_from_below():
    """A learner who stops at the END line never needs to jump below it: each name defined below it (a function,
    a class, a table such as TOOL_REWARD_FUNCS) that the code above uses is named in the glossary at the line.
    Using a new helper or table from the first reading means a glossary line for it."""
    with open(grpo.__file__) as f:
        source = f.read()
    lines = source.splitlines()
    end = next(i + 1 for i, line in enumerate(lines) if line.startswith("# ===") and "END OF THE ALGORITHM" in line)
    tree = ast.parse(source)
    below = set().union(*(module_names(node) for node in tree.body if node.lineno > end))
    used = set()
    for node in (node for node in tree.body if node.lineno < end):
        used |= {x.id for x in ast.walk(node) if isinstance(x, ast.Name) and x.id in below}
    glossary = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines[end:]))
    missing = [name for name in sorted(used) if not re.search(rf"\b{name}\b", glossary)]
    assert len(used) > 20 and "TOOL_REWARD_FUNCS" in used and not missing, missing


def test_one_meaning_per_name_and_the_first_readings_data_before_its_use():
    """A local (a variable, an argument, a nested function) never takes the name of something grpo.py defines at
    module level (generate's draw is not the global sample), so a reader never opens the wrong one; and each class
    and table above the END line (Rollout, REWARD_FUNCS, ...) stands above the first line that uses it."""
    with open(grpo.__file__) as f:
        source = f.read()
    tree, lines = ast.parse(source), source.splitlines()
    defined = {name: node for node in tree.body for name in module_names(node)}
    shadows = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))):
        local = {x.id for x in ast.walk(fn) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Store)}
        local |= {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        local |= {x.name for x in ast.walk(fn) if isinstance(x, ast.FunctionDef) and x is not fn}
        shadows += [(getattr(fn, "name", "lambda"), name) for name in sorted(local & set(defined))]
    assert not shadows, shadows
    end = next(i + 1 for i, line in enumerate(lines) if line.startswith("# ===") and "END OF THE ALGORITHM" in line)
    data = [name for name, node in defined.items() if node.lineno < end and not isinstance(node, ast.FunctionDef)]
    fields = {
        name: {x.target.id for x in getattr(defined[name], "body", []) if isinstance(x, ast.AnnAssign)} for name in data
    }
    first_use = {name: min((x.lineno for x in ast.walk(tree) if isinstance(x, ast.Name) and x.id == name and
                            isinstance(x.ctx, ast.Load) or isinstance(x, ast.Attribute) and x.attr in fields[name]),
                           default=10**9) for name in data}  # fmt: skip  # a class's use: its name, or its fields
    late = {name: (defined[name].lineno, line) for name, line in first_use.items() if line < defined[name].lineno}
    assert "Rollout" in data and "REWARD_FUNCS" in data and not late, late


# ----------------------------------------------------------------------------- the README's Fork-it diffs, applied
def fork_it_edits() -> list[tuple[str, str, set[str]]]:
    """(title, diff, the tests the README says it changes) for each diff in the README's 'Fork it' section: the list
    is the sentence 'Tests it changes: ...' in the diff's own paragraphs (the bold title to the next one)."""
    with open(os.path.join(HERE, "README.md")) as f:
        section = f.read().split("\n## Fork it\n")[1].split("\n## ")[0]
    edits = []
    for block in section.split("\n**")[1:]:
        diff = re.search(r"```diff\n(.*?)```", block, re.S)
        lists = re.findall(r"Tests it changes:([^.]*)\.", block.replace("\n", " "))
        assert diff and len(lists) == 1, f"README, Fork it: {block[:40]!r} needs one diff and one 'Tests it changes:'"
        edits.append((block.split("**")[0], diff.group(1), set(re.findall(r"`(test_\w+)`", lists[0]))))
    return edits


def apply_fork_diff(source: str, diff: str) -> tuple[str, list[int]]:
    """The source with a README diff applied, and the lines (1-based, of the original) each hunk replaced. A hunk is
    its context (' ') and removed ('-') lines, which must occur exactly once, and what replaces them (' ', '+')."""
    hunks = []
    for hunk in diff.split("@@\n"):
        lines = hunk.splitlines()
        old = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "-", ""))
        new = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "+", ""))
        at = [m.start() for m in re.finditer(re.escape(old), source) if m.start() == 0 or source[m.start() - 1] == "\n"]
        assert len(at) == 1, f"this hunk of the README's diff matches grpo.py {len(at)} times, not once:\n{hunk}"
        hunks.append((at[0], old, new))
    changed = [
        line
        for at, old, _ in hunks
        for line in range(source.count("\n", 0, at) + 1, source.count("\n", 0, at + len(old)) + 1)
    ]
    for at, old, new in sorted(hunks, reverse=True):  # from the last, so that each position still holds
        source = source[:at] + new + source[at + len(old) :]
    return source, changed


def guard_tests(changed_lines: list[int]) -> set[str]:
    """The tests that guard what an edit changes, cheaply: each test that uses (itself or through this file's helpers)
    a name of grpo.py whose definition the edit touches, or a function of grpo.py that uses such a name itself, less
    the end-to-end runs (through main: the full check runs them); and every test that reads grpo.py's source (the
    file's shape: lines an edit moves)."""
    with open(grpo.__file__) as f:
        nodes = ast.parse(f.read()).body
    edited = set()
    for line in changed_lines:  # a changed comment belongs to the definition below it
        edited |= module_names(next((n for n in nodes if n.end_lineno >= line), nodes[-1]))
    uses = {name: {x.id for x in ast.walk(n) if isinstance(x, ast.Name)} for n in nodes for name in module_names(n)}
    watched = edited | {name for name, used in uses.items() if used & edited}
    with open(os.path.join(HERE, "test_grpo.py")) as f:
        defs = {n.name: n for n in ast.parse(f.read()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    def reach(name: str, seen: set) -> set[str]:  # grpo names used by a test function and the helpers it calls
        seen.add(name)
        used = set()
        for x in ast.walk(defs[name]):
            if isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name) and x.value.id == "grpo":
                used.add(x.attr)
            elif isinstance(x, (ast.Name, ast.arg)) and (key := getattr(x, "id", getattr(x, "arg", ""))) in defs:
                used |= reach(key, seen) if key not in seen else set()
        return used

    tests = {name: reach(name, set()) for name in defs if name.startswith("test_")}
    tests.pop("test_the_readmes_fork_it_diffs_change_the_tests_it_lists")
    return {name for name, used in tests.items() if "main" not in used and (used & watched or "__file__" in used)}


def failing_tests(source: str, tests: set[str], tmp_path) -> set[str]:
    """Run `tests` of this file against grpo.py replaced by `source`, in a copy of the repository (its top-level files,
    such as make_lookup_task.py and pass_at_kt.py, which tests run, and docs/): the ones that fail."""
    for name in os.listdir(HERE):
        if os.path.isfile(os.path.join(HERE, name)) and name != "grpo.py":
            shutil.copy(os.path.join(HERE, name), tmp_path / name)
    shutil.copytree(os.path.join(HERE, "docs"), tmp_path / "docs")
    (tmp_path / "grpo.py").write_text(source)
    select = [f"test_grpo.py::{name}" for name in sorted(tests)] if tests is not None else ["test_grpo.py"]
    this = "--deselect=test_grpo.py::test_the_readmes_fork_it_diffs_change_the_tests_it_lists"  # no recursion
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", this, *select], cwd=tmp_path, capture_output=True, text=True, timeout=3600)  # fmt: skip
    failed = set(re.findall(r"^(?:FAILED|ERROR) test_grpo\.py::(\w+)", run.stdout, re.M))
    assert run.returncode in (0, 1) and (failed or run.returncode == 0), run.stdout[-3000:] + run.stderr[-3000:]
    return failed


@pytest.mark.parametrize("title, diff, listed", fork_it_edits(), ids=[title for title, _, _ in fork_it_edits()])
def test_the_readmes_fork_it_diffs_change_the_tests_it_lists(title, diff, listed, tmp_path):
    """README, Fork it: each diff applies to grpo.py as written there, keeps every FORK HERE marker, and changes
    exactly the tests the README lists for it. Run: the listed tests and every test that guards what the diff edits
    (guard_tests); with GRPO_FORK_CHECK=full, the whole file for each diff (slow). A fork that edits the README's
    diffs, or a change to grpo.py that moves what they edit, updates the README with this test."""
    with open(grpo.__file__) as f:
        source = f.read()
    forked, changed = apply_fork_diff(source, diff)
    compile(forked, "grpo.py", "exec")
    markers = [re.findall(r"FORK HERE: ([\w ]+)", text) for text in (source, forked)]
    assert markers[0] == markers[1] and len(markers[0]) == 4, markers  # each marker kept, where it was
    full = os.environ.get("GRPO_FORK_CHECK") == "full"
    run = None if full else listed | guard_tests(changed)
    assert full or len(run) > len(listed), "no test guards what this diff edits"
    assert failing_tests(forked, run, tmp_path) == listed


def test_the_docstring_examples_hold():
    """Every >>> example in grpo.py's docstrings returns what it shows: readers learn the rewards and the
    calculator from them."""
    import doctest

    for module in (grpo, importlib.import_module("pass_at_kt")):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module


# ----------------------------------------------------------------------------- Tools: partial credit, attacked
def formatted(reasoning: str, answer: str) -> str:
    """A completion in the exact format, so that the format rewards pay the same in every row below."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


HONEST = formatted("347 * 86 = <calc>347 * 86</calc><result>29842</result>", "29842")


# (what it tries, completion, then what each of TOOL_REWARD_FUNCS pays: tool_reward, grounded_call_reward,
# answer_from_call_reward, well_formed_call_reward) for CRATES, gold 29842
ATTACKS = [
    ("a right answer, no call", formatted("347 times 86 is 29842", "29842"), 0, 0, 0, 0),
    ("a bare number", formatted("<calc>29842</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("a number with no operator", formatted("<calc>(29842)</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("signs, no operator", formatted("<calc>-(-29842)</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("invented numbers", formatted("<calc>29841 + 1</calc><result>29842</result>", "29842"), 0, 0, 0, 1),
    ("a copy through * 1", formatted("<calc>29842 * 1</calc><result>29842</result>", "29842"), 0, 0, 0, 1),
    ("a guess laundered through a bare call",
     formatted("<calc>29928</calc><result>29928</result> <calc>29928 - 86</calc><result>29842</result>", "29842"),
     0, 0, 0, 1),
    ("one question number with itself", formatted("<calc>347 - 347</calc><result>0</result>", "29842"), 0, 0, 0, 1),
    ("and that result as the answer", formatted("<calc>347 - 347</calc><result>0</result>", "0"), 0, 0, 0, 1),
    ("a typed result, right answer", formatted("<calc>347 + 86</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("a typed result, used", formatted("<calc>347 * 86</calc><result>30000</result>", "30000"), 0, 0, 0, 0),
    ("a result with no call", formatted("</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("an unclosed call", formatted("<calc>347 * 86<result>29842</result>", "29842"), 0, 0, 0, 0),
    ("a failed call", formatted("<calc>347 * 86 = 29842</calc><result>error: invalid syntax</result>", "29842"),
     0, 0, 0, 0),
    ("spam: 16 bare calls, a guess", formatted("<calc>1</calc><result>1</result>" * 16, "29842"), 0, 0, 0, 0),
    ("spam: the wrong grounded call 16 times", formatted("<calc>347 + 86</calc><result>433</result>" * 16, "29842"),
     0, 1, 0, 1),
    ("a result not used", formatted("<calc>347 * 86</calc><result>29842</result>", "30000"), 0, 1, 0, 1),
    ("a question number as the answer", formatted("<calc>347 * 86</calc><result>29842</result>", "347"), 0, 1, 0, 1),
    ("the wrong operation, used", formatted("<calc>347 + 86</calc><result>433</result>", "433"), 0, 1, 1, 1),
    ("the call inside the answer", formatted("", "<calc>347 * 86</calc><result>29842</result>"), 0, 1, 0, 1),
    ("the right call after the answer", formatted("", "29842") + " <calc>347 * 86</calc><result>29842</result>",
     1, 1, 1, 1),
    ("a guess, then a call past the 16th", formatted("<calc>1</calc><result>1</result>" * 16
     + "<calc>347 * 86</calc><result>29842</result>", "29842"), 0, 0, 0, 0),
    ("spam: a well-formed call on invented numbers 16 times, a guess",
     formatted("<calc>1 + 1</calc><result>2</result>" * 16, "29842"), 0, 0, 0, 1),
    ("a well-formed call on invented numbers, its result used", formatted("<calc>2 * 3</calc><result>6</result>", "6"),
     0, 0, 0, 1),
    ("a call the calculator refused", formatted("<calc>347 / 0</calc><result>error: division by zero</result>", "29842"),
     0, 0, 0, 0),
]  # fmt: skip


@pytest.mark.parametrize("name, completion, expected", [(a[0], a[1], list(a[2:])) for a in ATTACKS],
                         ids=[a[0] for a in ATTACKS])  # fmt: skip
def test_partial_credit_pays_only_for_the_real_thing(name, completion, expected):
    paid = [fn(completion, "29842", question=CRATES) for fn, _ in grpo.TOOL_REWARD_FUNCS]
    assert paid == expected
    assert [fn(HONEST, "29842", question=CRATES) for fn, _ in grpo.TOOL_REWARD_FUNCS] == [1, 1, 1, 1]


def total_reward(completion: str) -> float:
    """Every reward of a --tools run, as training calls them (a length reward gets a token count: characters here)."""
    funcs = grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS
    row = {"question": CRATES, "gold": "29842"}
    return grpo.score([completion], [row], funcs, [len(completion)], 1000)[0][0].item()


def test_no_attack_pays_as_much_as_the_work():
    """Every way in the table of skipping the work (computing 347 * 86 with the calculator and answering its
    result) pays less in total, with every reward of a --tools run, than the honest completion."""
    honest = total_reward(HONEST)
    paid = {name: total_reward(completion) for name, completion, *_ in ATTACKS}
    assert all(p < honest for p in paid.values()), (honest, paid)
    assert max(paid.values()) <= honest - 0.5  # the nearest, the call after the answer, loses the format


def test_right_answer_dominates():
    """A right answer always outscores a wrong one: everything a wrong answer can collect (every reward but
    correctness_reward and tool_reward, which pay only right answers) weighs less than correctness alone. What
    a reward can pay is its weight times the most it pays on the table's completions: a penalty a fork adds
    (README, Fork it) pays nothing, and fails this test only if it makes a wrong answer outscore a right one."""
    table = [HONEST] + [completion for _, completion, *_ in ATTACKS]
    wrong_max = 0.0
    for fn, weight in grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS:
        if fn not in (grpo.correctness_reward, grpo.tool_reward):
            rows, tokens = [{"question": CRATES, "gold": "29842"}] * len(table), [len(c) for c in table]
            paid = grpo.score(table, rows, [(fn, 1.0)], tokens, 1000)[0]  # each rubric reward reaches 1 on HONEST
            wrong_max += weight * max(0.0, paid.max().item())
    weights = {fn.__name__: w for fn, w in grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS}
    assert wrong_max < weights["correctness_reward"]
    wrong = [total_reward(c) for _, c, *_ in ATTACKS if not grpo.correctness_reward(c, "29842")]
    right = [total_reward(c) for _, c, *_ in ATTACKS if grpo.correctness_reward(c, "29842")]
    assert max(wrong) < min(right), (max(wrong), min(right))


def test_grounded_results_follow_results_from_call_to_call():
    question = "Tom has 3 bags of 12 apples and eats 5. How many are left?"
    chained = "<calc>3 * 12</calc><result>36</result> then <calc>36 - 5</calc><result>31</result> <answer>31</answer>"
    assert grpo.grounded_results(chained, question) == [(36.0, 2), (31.0, 2)]
    assert grpo.answer_from_call_reward(chained, "31", question=question) == 1.0
    assert grpo.grounded_call_reward("<calc>36 - 5</calc><result>31</result>", "31", question=question) == 0.0


# ----------------------------------------------------------------------------- every setting takes effect
# Each test here fails when grpo.py ignores one Config field (uses its default or a constant instead of the value
# given); docs/tests.md has the table of every field and the test that guards it, each breakage run.
TWO_QUESTIONS = [{"question": "1+2?", "gold": "3"}, {"question": "what is 12 + 30?", "gold": "42"}]


def one_step(tiny_model, monkeypatch, **kw):
    """One grpo_step (2 questions x G = 4, fp32, no reference model) with a reward in [0, 1] that varies within
    groups. Returns the rows and advantages of each grpo_loss call, the gradient the optimizer stepped with,
    the step's metric sums and the rewards."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    calls, loss = [], grpo.grpo_loss

    def recording(logp, old_logp, ref_logp, advantages, mask, *args, **kwargs):
        calls.append((logp.shape[0], advantages.detach().clone()))
        return loss(logp, old_logp, ref_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", recording)
    model, tok = load(tiny_model)
    cfg = grpo.Config(group_size=4, max_new_tokens=8, beta=0.0, precision="fp32", **kw)
    optimizer = RecordingSGD(model, lr=0.1)
    torch.manual_seed(0)
    sums, applied, _, rewards = grpo.grpo_step(model, model, None, tok, optimizer, TWO_QUESTIONS, cfg)
    assert applied == [True]
    ((_, grad),) = optimizer.passes
    return calls, grad, sums, rewards


def test_micro_batch_size_sets_the_rows_of_each_forward(tiny_model, monkeypatch):
    """--micro_batch_size: the update runs the batch's B = 8 completions 3 at a time (3, 3, 2), not all at once.
    The gradient is the same either way (test_micro_batched_gradient_equals_full_batch), so only this sees it."""
    calls, _, _, _ = one_step(tiny_model, monkeypatch, micro_batch_size=3)
    assert [rows for rows, _ in calls] == [3, 3, 2]


def test_no_scale_rewards_leaves_the_advantages_unscaled(tiny_model, monkeypatch):
    """--no-scale_rewards (Dr. GRPO): the loss gets A = r - mean(r of the group), not divided by the group's std.
    Rewards lie in [0, 1], so a group's std is at most 0.58 (two 0s and two 1s): dividing by it would change
    every advantage that is not 0, and some are not."""
    calls, _, _, rewards = one_step(tiny_model, monkeypatch, scale_rewards=False)
    advantages = torch.cat([a for _, a in calls])
    r = rewards.view(-1, 4)
    expected = (r - r.mean(1, keepdim=True)).flatten()
    assert expected.abs().max() > 0
    assert torch.allclose(advantages, expected, rtol=1e-6, atol=1e-7), (advantages, expected)


def test_the_gradient_is_clipped_to_max_grad_norm(tiny_model, monkeypatch):
    """--max_grad_norm: the optimizer steps with the gradient scaled down to norm max_grad_norm, while grad_norm
    logs the norm before clipping. torch's clip_grad_norm_ scales by max / (norm + 1e-6): for a norm above 1e-3
    (asserted, so the clip is at work) the clipped norm is max_grad_norm = 1e-4 to a relative 1e-3."""
    _, grad, sums, _ = one_step(tiny_model, monkeypatch, max_grad_norm=1e-4)
    assert sums["grad_norm"][0] > 1e-3
    assert grad.norm().item() == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_the_optimizer_takes_the_rate_decay_and_warmup_given(tiny_model, lora):
    """--lr (with --lora_rank: --lora_lr), --weight_decay and --warmup_steps reach AdamW: update k runs at
    rate * k / warmup_steps until warmup_steps, then at rate (setup_training's schedule; main logs this lr)."""
    model, _ = load(tiny_model)
    rate = 3e-4  # neither --lr's default nor --lora_lr's
    lr = dict(lora_rank=2, lora_lr=rate) if lora else dict(lr=rate)
    cfg = grpo.Config(beta=0.0, weight_decay=0.05, warmup_steps=4, **lr)
    _, _, optimizer, scheduler = grpo.setup_training(model, cfg, None, 1, torch.device("cpu"), False)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves, and the schedule sees an update
        scheduler.step()
    assert rates == pytest.approx([rate / 4, rate / 2, rate * 3 / 4, rate, rate, rate])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05] * len(optimizer.param_groups)


def test_lora_update_is_scaled_by_alpha_over_rank(tiny_model):
    """--lora_alpha with --lora_rank: an adapted layer computes W x + (alpha / r) B A x, with A (r, in) and
    B (out, r); here alpha 8 over r 2, a scale of 4 (the default alpha would give 16). B starts at 0, so it is
    set here to give the update a value."""
    model, _ = load(tiny_model)
    grpo.add_lora(model, grpo.Config(lora_rank=2, lora_alpha=8.0), None)
    layer = grpo.lora_layers(model)[0]
    assert layer.lora_A.shape == (2, layer.in_features) and layer.lora_B.shape == (layer.out_features, 2)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
        with grpo.adapters_off(model):
            base = layer(x)
        update = layer(x) - base
        expected = 4.0 * x @ layer.lora_A.T @ layer.lora_B.T
    assert expected.abs().max() > 0
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-5)


def test_evaluation_draws_eval_batch_size_problems_at_a_time_and_eval_samples_each(tiny_model, tmp_path, monkeypatch):
    """--eval_batch_size problems per generation, each answered greedily and, with --eval_samples k, sampled k
    times at --temperature: 7 problems in batches of 3 are 3, 3 and 1."""
    calls, generate = [], grpo.generate
    monkeypatch.setattr(grpo, "generate", lambda s, t, questions, G, T, *a: calls.append((len(questions), G, T))
                        or generate(s, t, questions, G, T, *a))  # fmt: skip
    model, tok = load(tiny_model)
    cfg = grpo.Config(output_dir=str(tmp_path), eval_batch_size=3, eval_samples=2, temperature=0.7, max_new_tokens=4)
    rows = [{"question": f"{i}+1?", "gold": str(i + 1)} for i in range(7)]
    grpo.evaluate(model, tok, rows, cfg, 0, torch.device("cpu"))
    assert calls == [(3, 1, 0.0), (3, 2, 0.7), (3, 1, 0.0), (3, 2, 0.7), (1, 1, 0.0), (1, 2, 0.7)]


def test_tools_prompt_the_call_and_max_tool_calls_caps_the_answered_calls(tiny_model, monkeypatch):
    """--tools: the prompt teaches the call, and the rollout's environment answers; --max_tool_calls T caps
    a completion's answered calls at T. frequent_env stands in for the calculator (a random model writes no
    <calc>) and, like it, is given T; with T = 1 no completion has a second reply, and with T = 3 (the same
    draws) some completion has more than one, so the cap is at work."""
    monkeypatch.setattr(grpo, "tool_env", frequent_env)
    model, tok = load(tiny_model)

    def most_replies(T: int) -> int:
        cfg = grpo.Config(tools="calculator", max_tool_calls=T, max_new_tokens=24)
        torch.manual_seed(0)
        ro = grpo.generate(model, tok, ["1+1?", "2+2?"], 4, 1.0, cfg, torch.device("cpu"))
        assert "<calc>" in tok.decode(ro.prompt_ids[0])
        starts = ro.by_env & ~torch.nn.functional.pad(ro.by_env, (1, 0))[:, :-1]  # (B, L) each reply's first token
        return int(starts.sum(1).max())

    assert most_replies(1) == 1 and most_replies(3) > 1


def test_trust_remote_code_reaches_both_loaders(tiny_model, monkeypatch):
    """--trust_remote_code is given to the tokenizer's and the model's from_pretrained (off by default, so
    transformers refuses a model that ships code of its own)."""
    seen = []
    for cls in (grpo.AutoTokenizer, grpo.AutoModelForCausalLM):
        load_it = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _load=load_it, **kw: seen.append(kw["trust_remote_code"])
                            or _load(*a, **kw))  # fmt: skip
    grpo.load_model(tiny_model, grpo.Config(trust_remote_code=True), torch.device("cpu"))
    assert seen == [True, True]


def test_a_hub_dataset_is_loaded_with_its_config(monkeypatch):
    """--dataset_config names the hub dataset's configuration (GSM8K has main and socratic); datasets' loader is
    replaced here, as the tests download nothing."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "1+1?", "answer": "so #### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = grpo.load_rows(grpo.Config(dataset="openai/gsm8k", dataset_config="socratic"), "test")
    assert calls == [("openai/gsm8k", "socratic", "test")] and rows[0]["gold"] == "2"


def test_save_eval_and_sample_every_n_steps(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    """--save_every, --eval_every and --sample_every 2 over 3 steps: a checkpoint at step 2 and at the last, an
    evaluation of --eval_size problems before training, at step 2 and at the last, and the best and worst
    completion printed at step 2 (the reward varies within groups at random init, so the group has a best and a
    worst). Each default is 10 or more, so a run that ignored the setting would do these at the last step (or
    never) only."""
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    monkeypatch.setattr(grpo, "plot_metrics", lambda output_dir: None)  # drawn at every save; its own test has it
    saved, save = [], grpo.save_checkpoint
    monkeypatch.setattr(grpo, "save_checkpoint", lambda cfg, m, t, o, s, step, *a: saved.append(step)
                        or save(cfg, m, t, o, s, step, *a))  # fmt: skip
    cfg = tiny_config(tiny_model, tiny_data, tmp_path, steps=3, save_every=2, eval_every=2, sample_every=2, eval_size=2)
    grpo.main(cfg)
    assert saved == [2, 3]
    assert [r["step"] for r in read_metrics(cfg) if "eval/accuracy_strict" in r] == [0, 2, 3]
    for step in (0, 2, 3):  # --eval_size 2: the first 2 of the 6 test problems
        with open(os.path.join(cfg.output_dir, f"eval_{step}.jsonl")) as f:
            assert [json.loads(line)["index"] for line in f] == [0, 1]
    assert capsys.readouterr().out.count("--- question:") == 1


def test_the_seed_picks_the_questions_and_the_samples(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--seed: runs with seeds 1 and 2 train on other questions and sample from other random states (each step
    seeds itself from (seed, rank, step), the data order is a shuffle seeded by the seed; with the same seed the
    two runs would be the same, test_each_step_draws_its_own_samples_and_a_resumed_step_the_same)."""
    draws, rollout = [], grpo.rollout

    def recording(model, prompt_ids, *args, **kwargs):
        draws.append((prompt_ids.clone(), torch.get_rng_state()))
        return rollout(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(grpo, "rollout", recording)
    for seed in (1, 2):
        grpo.main(tiny_config(tiny_model, tiny_data, tmp_path / str(seed), steps=1, eval_size=0, seed=seed))
    (prompts_1, state_1), (prompts_2, state_2) = draws
    assert not torch.equal(prompts_1, prompts_2) and not torch.equal(state_1, state_2)


@pytest.mark.parametrize("lora", [False, True])
def test_beta_zero_loads_no_reference_model(tiny_model, lora):
    """--beta 0 drops the KL term, and with it pi_ref: no copy of the model (none of its memory) is made; with
    beta > 0 there is one (with LoRA, the model itself with its adapters off)."""
    extra = dict(lora_rank=2) if lora else {}
    refs = [grpo.setup_training(load(tiny_model)[0], grpo.Config(beta=beta, **extra), None, 1, torch.device("cpu"),
                                False)[1] for beta in (0.0, 0.04)]  # fmt: skip
    assert refs[0] is None and refs[1] is not None


def test_every_gpu_difference_has_a_test():
    """docs/tests.md's table of the ways a default GPU run differs from the CPU suite: each row names the CPU tests
    that run the GPU's choice or hold its decision, and every test it names exists (renamed: renamed there too)."""
    with open(os.path.join(HERE, "docs", "tests.md")) as f:
        section = f.read().split("## What a GPU run does that the CPU suite does not")[1].split("\n## ")[0]
    rows = re.findall(r"^\| ([^|`]+) \| .*? \| (.*) \|$", section, re.M)[1:]  # less the header
    with open(os.path.join(HERE, "test_grpo.py")) as f:
        defined = set(re.findall(r"^def (test_\w+)", f.read(), re.M))
    assert {"Optimizer", "bf16 compute", "Attention kernel", "Allocator", "Device index", "DDP backend"} <= {
        r for r, _ in rows
    }
    for what, where in rows:
        named = set(re.findall(r"`(test_\w+)`", where))
        assert (named or "CPU-only" in where or "not promised" in where) and named <= defined, (what, named - defined)


def test_every_setting_has_a_row_and_its_tests_exist():
    """docs/tests.md's table names, for every Config field, the tests that fail when the program ignores it: a
    new field needs a row (and a test), and a renamed test its new name there."""
    with open(os.path.join(HERE, "docs", "tests.md")) as f:
        rows = re.findall(r"^\| `(\w+)` \| .*? \| (.*) \|$", f.read().split("## Every logged number")[0], re.M)
    assert {field for field, _ in rows} == {f.name for f in dataclasses.fields(grpo.Config)}
    with open(os.path.join(HERE, "test_grpo.py")) as f:
        defined = set(re.findall(r"^def (test_\w+)", f.read(), re.M))
    for field, tests in rows:
        named = re.findall(r"`(test_\w+)", tests)
        assert named and set(named) <= defined, (field, set(named) - defined)


# ----------------------------------------------------------------------------- every logged number, by hand
# Each key that metrics.jsonl can hold is computed here by hand on a case where its value is known and differs from
# the plausible mistakes (the complement, the unmasked mean, another denominator, one rank's share, the step before);
# docs/tests.md has the table of every key, its definition in one line, and the tests that hold it.
def hand_rollout(tok, specs: list[str], L: int) -> grpo.Rollout:
    """A rollout written by hand, one string per completion: what the model wrote, with each environment's reply
    between « and »; it ends with the model's EOS, or with '…' where it was cut off (its first L tokens). The test
    tokenizer gives one token per character. The texts are decoded as generate decodes them."""
    rows = []
    for spec in specs:
        ids, env = [], []
        for i, text in enumerate(re.split("[«»]", spec.removesuffix("…"))):  # model, reply, model, ...
            t = tok(text, add_special_tokens=False).input_ids
            ids, env = ids + t, env + [i % 2 == 1] * len(t)
        ids, env = (ids[:L], env[:L]) if spec.endswith("…") else (ids + [tok.eos_token_id], env + [False])
        assert len(ids) == L if spec.endswith("…") else len(ids) <= L
        rows.append((ids, env))
    pad = [tok.pad_token_id] * L
    return grpo.Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        completion_ids=torch.tensor([(ids + pad)[:L] for ids, _ in rows]),
        lengths=torch.tensor([len(ids) for ids, _ in rows]),
        ended=torch.tensor([not spec.endswith("…") for spec in specs]),
        sample_logp=torch.zeros(len(rows), L),
        by_env=torch.tensor([(env + [False] * L)[:L] for _, env in rows]),
        texts=[tok.decode(ids, skip_special_tokens=True) for ids, _ in rows],
    )


def model_tokens(spec: str, L: int) -> int:
    """The tokens the model wrote, counted from the spec: its text (not the replies) and its EOS; L if cut off."""
    if spec.endswith("…"):
        assert "«" not in spec  # a cut-off completion here is the model's text alone
        return L
    return len("".join(re.split("[«»]", spec)[::2])) + 1


def has_answer_tag(completion: str, answer: str, **kwargs) -> float:
    return float("<answer>" in completion)


# Two completions (G = 2) for each of four questions, the environment's replies between « and »
ROLLOUT_SPECS = [
    "1+2=«<result>3</result>»<answer>3</answer>",  # right, 1 call
    "<answer>3</answer>",  # right: the group's rewards are equal, no signal
    "<answer>4</answer>",  # wrong
    "2+3«<result>error: bad</result>»<answer>5</answer>",  # right, a failed call
    "7 7 7",  # no tag
    "a«<result>1</result>»b«<result>2</result>»c«<result>3</result>»<answer>7",  # 3 calls, no closed answer
    "9" * 80 + "…",  # cut off at L
    "<answer>8</answer>",
]
ROLLOUT_GOLDS = ["3", "3", "5", "5", "7", "7", "9", "9"]


def test_rollout_metrics_by_hand_on_one_rank_and_two(monkeypatch):
    """The step's numbers to watch (rollout_metrics, as main reduces them) on a batch written by hand, 8 completions
    in groups of 2: reward 0.9375 (the weighted mean: correctness x 2 and an answer-tag reward x 0.25), reward/<fn>
    unweighted (3/8 and 6/8), accuracy 3/8, truncated_frac 1/8 (the one cut off, not the 7/8 that ended),
    frac_zero_std 1/4 (1 group of 4, not 1 of 8 completions), completion_len the model's own tokens (not the
    environment's replies), tool_calls 5/8, tool_errors 1/5 of the calls (not 1/8 of the completions). Under
    torchrun, the two halves on two ranks give the whole batch's figures: the failed call is rank 0's 1 of 2, rank 1
    has 3 calls and none failed, so the mean of the ranks' shares (1/4) would differ from 1/5."""
    tok, L, G = make_tokenizer(), 72, 2
    rows = [{"question": f"question {i // G}", "gold": gold} for i, gold in enumerate(ROLLOUT_GOLDS)]
    cfg = grpo.Config(group_size=G, max_new_tokens=L, tools="calculator")
    funcs = [(grpo.correctness_reward, 2.0), (has_answer_tag, 0.25)]
    written = [model_tokens(spec, L) for spec in ROLLOUT_SPECS]

    def figures(part: slice):  # this part's sums, as grpo_step gives them to main, and its rollout
        ro = hand_rollout(tok, ROLLOUT_SPECS[part], L)
        mask = ((torch.arange(L)[None] < ro.lengths[:, None]) & ~ro.by_env).float()  # by hand, not completion_mask
        assert mask.sum(1).tolist() == written[part]
        rewards, per_fn = grpo.score(ro.texts, rows[part], funcs, written[part], L)
        return grpo.rollout_metrics(ro, mask, rewards, per_fn, rows[part], tok, cfg), ro

    sums, ro = figures(slice(0, 8))
    m = grpo.reduce_metrics(sums, 1, torch.device("cpu"))
    expected = {"reward": (2 * 3 + 0.25 * 6) / 8, "reward/correctness_reward": 3 / 8, "reward/has_answer_tag": 6 / 8,
                "accuracy": 3 / 8, "truncated_frac": 1 / 8, "frac_zero_std": 1 / 4, "completion_len": sum(written) / 8,
                "tool_calls": 5 / 8, "tool_errors": 1 / 5}  # fmt: skip
    assert m == pytest.approx(expected, rel=1e-12)
    assert sum(written) < ro.lengths.sum().item()  # the unmasked mean (the replies counted) would differ
    # torchrun: rank 1 (the last two groups) reduces first, and what it gives all_reduce is added to rank 0's
    halves = [figures(slice(0, 4))[0], figures(slice(4, 8))[0]]
    given = []
    monkeypatch.setattr(grpo.dist, "all_reduce", lambda t, *a, **k: given.append(t.clone()))
    grpo.reduce_metrics(halves[1], 2, torch.device("cpu"))
    monkeypatch.setattr(grpo.dist, "all_reduce", lambda t, *a, **k: t.add_(given[0]))
    both = grpo.reduce_metrics(halves[0], 2, torch.device("cpu"))
    assert both == pytest.approx(expected, rel=1e-12)


# Five problems: the gold answer, the greedy answer (replies between « and ») and 3 samples; what each scores
EVAL_PROBLEMS = [
    ("3", "<reasoning>\n1+2«<result>3</result>»\n</reasoning>\n<answer>\n3\n</answer>",
     ["<answer>3</answer>", "<answer>1</answer>", "<answer>3</answer>"]),  # strict, lenient, format; 1 call; maj, pass
    ("4", "4*1«<result>4</result>» I think it is 4",
     ["<answer>4</answer>", "<answer>9</answer>", "<answer>9</answer>"]),  # lenient; 1 call; pass (the majority: 9)
    ("5", "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>",
     ["<answer>2</answer>", "<answer>2</answer>", "x"]),  # format
    ("6", "<reasoning>z</reasoning> <answer>6</answer>",  # strict, lenient; the format loosely, not exactly
     ["<answer>6</answer>", "x", "<answer>2</answer>"]),  # maj (a tie: the first drawn), pass
    ("8", "2*4«<result>error: x</result>»2*4«<result>8</result>» so 8",
     ["<answer>8</answer>"] * 3),  # lenient; 2 calls, 1 failed; maj, pass
]  # fmt: skip


def test_evaluation_figures_by_hand_over_two_ranks(tmp_path, monkeypatch):
    """evaluate with --tools and --eval_samples 3 on five problems whose answers are written by hand, sharded over
    two ranks (0, 2, 4 and 1, 3): each figure is the mean over all five problems, not one rank's share nor the mean
    of the two shares, nor its complement: accuracy_strict 2/5, accuracy_lenient 4/5, format 2/5 (exactly the
    format: 3/5 loosely), tool_calls 4/5 (calls per problem), tool_errors 1/4 (of the calls, not 1/5 of the
    problems), maj@3 3/5 (a wrong majority counts 0, though a sample is right; a tie goes to the first drawn),
    pass@3 4/5. Rank 1 evaluates first and hands its records to rank 0's all_gather_object."""
    tok = make_tokenizer()
    questions = [f"problem {i}?" for i in range(len(EVAL_PROBLEMS))]
    rows = [{"question": q, "gold": gold} for q, (gold, _, _) in zip(questions, EVAL_PROBLEMS)]

    def by_hand(model, prompt_ids, prompt_mask, G, max_new_tokens, temperature, eos, pad_id, env=None):
        asked = [next(i for i, q in enumerate(questions) if q in tok.decode(p)) for p in prompt_ids]
        specs = [EVAL_PROBLEMS[i][1] for i in asked] if G == 1 else [s for i in asked for s in EVAL_PROBLEMS[i][2]]
        ro = hand_rollout(tok, specs, max_new_tokens)
        return ro.completion_ids, ro.lengths, ro.ended, ro.sample_logp, ro.by_env

    monkeypatch.setattr(grpo, "rollout", by_hand)
    sampler = types.SimpleNamespace(eval=lambda: None, generation_config=None)  # the rollout is by hand: no model
    cfg = grpo.Config(output_dir=str(tmp_path), tools="calculator", eval_samples=3, eval_batch_size=2,
                      max_new_tokens=96)  # fmt: skip
    shared = []

    def gather_on_rank_1(out: list, records: list) -> None:
        shared.append(records)
        out[:] = [records, records]

    monkeypatch.setattr(grpo.dist, "all_gather_object", gather_on_rank_1)
    grpo.evaluate(sampler, tok, rows, cfg, 4, torch.device("cpu"), rank=1, world=2)
    assert [r["index"] for r in shared[0]] == [1, 3]
    monkeypatch.setattr(
        grpo.dist, "all_gather_object", lambda out, records: out.__setitem__(slice(None), [records, *shared])
    )
    m = grpo.evaluate(sampler, tok, rows, cfg, 4, torch.device("cpu"), rank=0, world=2)
    assert m == {"eval/accuracy_strict": 2 / 5, "eval/accuracy_lenient": 4 / 5, "eval/format": 2 / 5,
                 "eval/tool_calls": 4 / 5, "eval/tool_errors": 1 / 4, "eval/maj@3": 3 / 5, "eval/pass@3": 4 / 5}  # fmt: skip
    with open(tmp_path / "eval_4.jsonl") as f:  # rank 0 writes every problem's record, in order
        assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3, 4]


UPDATE_PASSES = [  # what two passes of the update return, {name: [total, count]}: 10 tokens each
    {"loss": [0.3, 1.0], "kl": [2.0, 10.0], "clip_frac": [0.0, 10.0], "logp_mismatch": [0.5, 10.0], "grad_norm": [4.0, 1.0]},
    {"loss": [0.1, 1.0], "kl": [4.0, 10.0], "clip_frac": [3.0, 10.0], "logp_mismatch": [9.0, 10.0], "grad_norm": [2.0, 1.0]},
]  # fmt: skip


def test_a_step_logs_the_mean_of_its_mu_passes_and_the_first_passs_mismatch(tiny_model, monkeypatch):
    """With --mu 2 a step's loss, kl, clip_frac and grad_norm are the means over its two passes (loss 0.2, not the
    last pass's 0.1 nor the sum 0.4; kl 0.3; clip_frac 0.15; grad_norm 3), and logp_mismatch is the first pass's
    alone (0.05: after an update the policy has moved, so a later pass measures the update, not the sampler)."""
    passes = iter(UPDATE_PASSES)
    monkeypatch.setattr(grpo, "fast_update", lambda *a: ({k: list(v) for k, v in next(passes).items()}, True))
    monkeypatch.setattr(grpo, "REWARD_FUNCS", [(digit_share, 1.0)])
    model, tok = load(tiny_model)
    cfg = grpo.Config(mu=2, group_size=2, max_new_tokens=4, beta=0.0, precision="fp32")
    torch.manual_seed(0)
    sums, applied, _, _ = grpo.grpo_step(model, model, None, tok, None, TWO_QUESTIONS, cfg)
    m = grpo.reduce_metrics(sums, 1, torch.device("cpu"))
    assert applied == [True, True]
    assert {k: m[k] for k in UPDATE_PASSES[0]} == pytest.approx(
        {"loss": 0.2, "kl": 0.3, "clip_frac": 0.15, "logp_mismatch": 0.05, "grad_norm": 3.0}, rel=1e-12
    )


@pytest.fixture(scope="module")
def logged_run(tiny_model, tiny_data, tmp_path_factory) -> dict:
    """One small run of main that the tests below share: 2 steps of 2 questions x 4 completions with tools (the
    frequent stand-in answers even a random model), an evaluation of 2 problems before training and after the
    last step with maj@2 and pass@2, a warmup over 4 updates, step 1's update refused as non-finite, and a clock
    that each step moves by a known time (3 and 5 s) and each evaluation by 100 s. Returns what a user reads (the
    records of metrics.jsonl, the console, the plot's figure) and what each step and evaluation was given and drew."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # no plot, and the tests of everything else still run
        Figure = types.SimpleNamespace(savefig=None)

    cfg = tiny_config(tiny_model, tiny_data, tmp_path_factory.mktemp("logged"), steps=2, eval_size=2, eval_samples=2,
                      warmup_steps=4, tools="calculator", max_new_tokens=12)  # fmt: skip
    clock, durations, refused = [0.0], iter([3.0, 5.0]), iter([True, False])
    drawn, steps, evals, figures = [], [], [], []
    generate, grpo_step, evaluate, clip_and_step = grpo.generate, grpo.grpo_step, grpo.evaluate, grpo.clip_and_step

    def recorded_step(policy, sampler, ref_model, tok, optimizer, rows, cfg, world=1):
        start = len(drawn)
        out = grpo_step(policy, sampler, ref_model, tok, optimizer, rows, cfg, world)
        clock[0] += next(durations)
        steps.append({"rows": rows, "rollout": drawn[start], "sums": out[0]})
        return out

    def recorded_evaluation(sampler, tok, rows, cfg, step, *args, **kwargs):
        start = len(drawn)
        metrics = evaluate(sampler, tok, rows, cfg, step, *args, **kwargs)
        clock[0] += 100.0
        evals.append({"step": step, "rows": rows, "rollouts": drawn[start:]})
        return metrics

    def refusing(model, optimizer, loss, *args):  # step 1's update is taken as non-finite
        return clip_and_step(model, optimizer, float("nan") if next(refused) else loss, *args)

    def kept(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    savefig = Figure.savefig
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as console:
        mp.setattr(grpo, "REWARD_FUNCS", grpo.REWARD_FUNCS + [(digit_share, 1.0)])  # varies within groups
        mp.setattr(grpo, "tool_env", frequent_env)
        mp.setattr(grpo, "time", types.SimpleNamespace(time=lambda: clock[0]))
        mp.setattr(grpo, "generate", lambda *a: drawn.append(generate(*a)) or drawn[-1])
        mp.setattr(grpo, "grpo_step", recorded_step)
        mp.setattr(grpo, "evaluate", recorded_evaluation)
        mp.setattr(grpo, "clip_and_step", refusing)
        mp.setattr(Figure, "savefig", kept)
        funcs = grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS
        grpo.main(cfg)
    return {"cfg": cfg, "records": read_metrics(cfg), "console": console.getvalue(), "figures": figures,
            "steps": steps, "evals": evals, "funcs": funcs, "durations": [3.0, 5.0]}  # fmt: skip


def replies(tok, ids: list[int], env: list[bool]) -> list[str]:
    """The environment's replies in a completion, by hand: its runs of environment tokens, decoded."""
    runs = itertools.groupby(zip(ids, env), key=lambda pair: pair[1])
    return [tok.decode([t for t, _ in run]) for by_env, run in runs if by_env]


def drawn_by_hand(tok, ro: grpo.Rollout) -> list[dict]:
    """Each completion of a rollout read by hand from its tokens, not from its lengths or ended: it ends at the first
    EOS the model wrote (past it, padding); the tokens the model wrote up to there, EOS included; cut off if the
    model wrote no EOS; the replies (their text) before that point."""
    out = []
    for ids, env in zip(ro.completion_ids.tolist(), ro.by_env.tolist()):
        ends = [t for t, (i, e) in enumerate(zip(ids, env)) if i == tok.eos_token_id and not e]
        n = ends[0] + 1 if ends else len(ids)
        out.append({"tokens": n - sum(env[:n]), "cut": not ends, "replies": replies(tok, ids[:n], env[:n])})
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_main_logs_each_step_once_with_the_rate_time_and_skips_it_had(logged_run):
    """metrics.jsonl holds one record per step, the evaluation before training as step 0 and the last one in the
    last step's record; lr is the rate each step's update used (warmup 1/4, then 1/4 again: step 1's update was
    refused, and the schedule counts applied updates, so not 2/4); skipped_updates counts the refused updates so
    far (1, 1: not the step's own 1, 0); step_time is the step's own time by the clock (3 and 5 s), the
    evaluations' 100 s not in it; tokens_per_s is the tokens the model wrote that step, counted by hand, over
    step_time."""
    records, cfg, tok = logged_run["records"], logged_run["cfg"], make_tokenizer()
    assert [r["step"] for r in records] == [0, 1, 2]
    evaluated = {"eval/accuracy_strict", "eval/accuracy_lenient", "eval/format", "eval/tool_calls",
                 "eval/tool_errors", "eval/maj@2", "eval/pass@2"}  # fmt: skip
    assert set(records[0]) == {"step"} | evaluated
    assert evaluated <= set(records[2]) and not evaluated & set(records[1])
    train = records[1:]
    assert [r["lr"] for r in train] == pytest.approx([cfg.lr / 4, cfg.lr / 4], rel=1e-12)
    assert [r["skipped_updates"] for r in train] == [1, 1]
    assert [r["step_time"] for r in train] == logged_run["durations"]
    for r, step in zip(train, logged_run["steps"]):
        tokens = sum(c["tokens"] for c in drawn_by_hand(tok, step["rollout"]))
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_time"], rel=1e-12)


def test_each_logged_figure_is_its_own_steps_by_hand(logged_run):
    """Every figure of a step's record, by hand from that step's questions and rollout (its tokens, who wrote each,
    the reward functions called here): the rewards (weighted, and each function's unweighted), accuracy,
    completion_len, truncated_frac, frac_zero_std, tool_calls and tool_errors; the update's numbers are that
    step's passes' (token-weighted: kl, clip_frac, logp_mismatch). Each evaluation's figures, by hand from its
    greedy answers and samples. The steps' figures differ from step to step, so the step before's would fail."""
    records, cfg, tok, G = logged_run["records"], logged_run["cfg"], make_tokenizer(), logged_run["cfg"].group_size
    by_step, hands = {r["step"]: r for r in records}, []
    for i, step in enumerate(logged_run["steps"], start=1):
        drawn, texts = drawn_by_hand(tok, step["rollout"]), step["rollout"].texts
        rows = [row for row in step["rows"] for _ in range(G)]
        values = {fn.__name__: [fn(text, row["gold"], question=row["question"], tokens=c["tokens"],
                                   max_tokens=cfg.max_new_tokens) for text, row, c in zip(texts, rows, drawn)]
                  for fn, _ in logged_run["funcs"]}  # fmt: skip
        rewards = [sum(w * values[fn.__name__][b] for fn, w in logged_run["funcs"]) for b in range(len(texts))]
        calls = sum(len(c["replies"]) for c in drawn)
        hand = {"reward": mean(rewards), **{f"reward/{k}": mean(v) for k, v in values.items()},
                "accuracy": mean(grpo.correctness_reward(t, row["gold"]) for t, row in zip(texts, rows)),
                "completion_len": mean(c["tokens"] for c in drawn), "truncated_frac": mean(c["cut"] for c in drawn),
                "frac_zero_std": mean(len(set(rewards[g : g + G])) == 1 for g in range(0, len(rewards), G)),
                "tool_calls": calls / len(drawn),
                "tool_errors": sum("error:" in r for c in drawn for r in c["replies"]) / max(1, calls)}  # fmt: skip
        assert {k: by_step[i][k] for k in hand} == pytest.approx(hand, rel=1e-6, abs=1e-9), i
        for k in ("loss", "kl", "clip_frac", "logp_mismatch", "grad_norm"):
            total, count = step["sums"][k]
            assert by_step[i][k] == total / count, (i, k)
        hands.append(hand)
    assert hands[0] != hands[1] and sum(h["tool_calls"] for h in hands) > 0
    assert all(h["truncated_frac"] != 0.5 for h in hands)  # so the share that ended (the complement) would differ
    for evaluation in logged_run["evals"]:
        rows, k = evaluation["rows"], cfg.eval_samples
        greedy = [t for ro in evaluation["rollouts"][0::2] for t in ro.texts]
        sampled = [t for ro in evaluation["rollouts"][1::2] for t in ro.texts]
        drawn = [c for ro in evaluation["rollouts"][0::2] for c in drawn_by_hand(tok, ro)]
        assert len(greedy) == len(rows) and len(sampled) == k * len(rows)
        votes = [[grpo.stated_number(grpo.extract_answer(s) or "") for s in sampled[j * k : (j + 1) * k]]
                 for j in range(len(rows))]  # fmt: skip
        majority = [max((v for v in vs if v is not None), key=vs.count, default=None) for vs in votes]
        calls = sum(len(c["replies"]) for c in drawn)
        hand = {"eval/accuracy_strict": mean(grpo.correctness_reward(t, r["gold"]) for t, r in zip(greedy, rows)),
                "eval/accuracy_lenient": mean(grpo.lenient_correctness(t, r["gold"]) for t, r in zip(greedy, rows)),
                "eval/format": mean(grpo.format_reward(t, r["gold"]) for t, r in zip(greedy, rows)),
                "eval/tool_calls": calls / len(rows),
                "eval/tool_errors": sum("error:" in r for c in drawn for r in c["replies"]) / max(1, calls),
                f"eval/maj@{k}": mean(m is not None and m == float(r["gold"]) for m, r in zip(majority, rows)),
                f"eval/pass@{k}": mean(any(grpo.correctness_reward(s, r["gold"]) for s in sampled[j * k : (j + 1) * k])
                                       for j, r in enumerate(rows))}  # fmt: skip
        assert {key: by_step[evaluation["step"]][key] for key in hand} == pytest.approx(hand, rel=1e-12)


CONSOLE_NAMES = {"acc": "accuracy", "clip": "clip_frac", "zero_std": "frac_zero_std", "len": "completion_len",
                 "trunc": "truncated_frac", "mismatch": "logp_mismatch", "tools": "tool_calls", "err": "tool_errors"}  # fmt: skip


def console_figures(line: str, record: dict) -> dict[str, str]:
    """The numbers a console line shows, as printed, by the key of metrics.jsonl that its label stands for."""
    shown = {}
    for part in line.split(" | "):
        if m := re.fullmatch(r"(?:eval )?step (\d+)(?:/\d+)?", part):
            shown["step"] = m[1]
        elif m := re.fullmatch(r"(\S+) tok/s", part):
            shown["tokens_per_s"] = m[1]
        elif m := re.fullmatch(r"(\S+)s", part):
            shown["step_time"] = m[1]
        elif m := re.fullmatch(r"reward (\S+) \((.*)\)", part):  # the total, then each function by its short name
            shown["reward"] = m[1]
            for name, value in re.findall(r"(\S+) (\S+)", m[2]):
                (key,) = [k for k in record if k.startswith("reward/") and k[7:].removesuffix("_reward") == name]
                shown[key] = value
        else:
            shown.update({CONSOLE_NAMES.get(name, name): value for name, value in re.findall(r"(\S+) (\S+)", part)})
    return shown


def assert_shows(shown: dict[str, str], record: dict) -> None:
    """Each number shown is the record's, to the digits shown."""
    for key, text in shown.items():
        assert f"{record[key]:.{len(text.partition('.')[2])}f}" == text, (key, text, record[key])


def test_the_console_line_shows_each_number_under_its_own_label(tmp_path):
    """log_step on a record whose numbers all differ (under bf16, so the sampler's mismatch is shown too; with
    tools and an evaluation): every label of the step line and the evaluation line shows its own key's number,
    to the digits shown, none left out, and metrics.jsonl gets the record as it is."""
    record = {"step": 7, "reward": 1.2345, "reward/correctness_reward": 0.625, "reward/format_reward": 0.375,
              "accuracy": 0.4375, "kl": 0.0123, "loss": -0.0456, "clip_frac": 0.0312, "frac_zero_std": 0.25,
              "completion_len": 37.4, "truncated_frac": 0.125, "logp_mismatch": 0.0078, "tool_calls": 1.5,
              "tool_errors": 0.3333, "grad_norm": 2.5, "lr": 1e-6, "skipped_updates": 0.0, "step_time": 12.5,
              "tokens_per_s": 987.6, "eval/accuracy_strict": 0.1, "eval/accuracy_lenient": 0.2, "eval/format": 0.3,
              "eval/tool_calls": 0.4, "eval/tool_errors": 0.5, "eval/maj@4": 0.6, "eval/pass@4": 0.7}  # fmt: skip
    lines = []
    bar = types.SimpleNamespace(write=lambda text: lines.extend(text.splitlines()))
    grpo.log_step(bar, record, grpo.Config(steps=9, output_dir=str(tmp_path)), True, "q", ["a"] * 8, torch.zeros(8))
    step_line, eval_line = lines
    shown = console_figures(step_line, record)
    not_shown = {"grad_norm", "lr", "skipped_updates"}  # in metrics.jsonl only
    assert set(shown) == {k for k in record if not k.startswith("eval/")} - not_shown
    assert_shows(shown, record)
    shown = console_figures(eval_line, record)
    assert set(shown) == {"step"} | {k for k in record if k.startswith("eval/")}
    assert_shows(shown, record)
    assert read_metrics(grpo.Config(output_dir=str(tmp_path))) == [record]


def test_the_console_and_the_plot_show_what_metrics_jsonl_holds(logged_run):
    """From one run: each step's console line and each evaluation's line show the numbers of its record in
    metrics.jsonl (to the digits shown), and every curve of metrics.png is a key's values at its steps there."""
    records, lines = logged_run["records"], logged_run["console"].splitlines()
    train = [line for line in lines if re.match(r"step \d+/\d+ \|", line)]  # not "step 1: ... skipped"
    evals = [line for line in lines if line.startswith("eval step ")]
    assert len(train) == len([r for r in records if "reward" in r])
    assert len(evals) == len([r for r in records if "eval/accuracy_strict" in r])
    for line, record in [*zip(train, [r for r in records if "reward" in r]),
                         *zip(evals, [r for r in records if "eval/accuracy_strict" in r])]:  # fmt: skip
        shown = console_figures(line, record)
        assert len(shown) > 6 and int(shown["step"]) == record["step"]
        assert_shows(shown, record)
    pytest.importorskip("matplotlib")
    (figure,) = logged_run["figures"]  # drawn once, at the end of the run
    curves = {line.get_label(): line for ax in figure.axes for line in ax.lines}
    for key, line in curves.items():
        points = [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
        assert points == [(r["step"], r[key]) for r in records if key in r], key
    assert {"reward", "accuracy", "kl", "completion_len", "frac_zero_std", "truncated_frac", "eval/accuracy_strict",
            "eval/accuracy_lenient", "eval/format"} | {k for k in records[1] if k.startswith("reward/")} == set(curves)  # fmt: skip


def assert_each_step_logged_once_for_both_ranks(output_dir, ranks: list) -> None:
    """Under torchrun (test_distributed_two_processes, 3 steps, evaluations at 0, 2 and 3): metrics.jsonl holds each
    step once, each record is what the ranks reduced (that test holds them to the count-weighted means of both
    ranks' sums), tokens_per_s counts both ranks' tokens, and each evaluation's figures are means over every
    problem of the gathered eval_<step>.jsonl, both ranks' shares."""
    records = read_metrics(grpo.Config(output_dir=str(output_dir)))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for record, a, b in zip(records[1:], *ranks):
        assert record == a["metrics"]
        tokens = a["sums"]["completion_len"][0] + b["sums"]["completion_len"][0]
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_time"], rel=1e-9)
    for record in [r for r in records if "eval/accuracy_strict" in r]:
        with open(os.path.join(output_dir, f"eval_{record['step']}.jsonl")) as f:
            problems = [json.loads(line) for line in f]
        assert [p["index"] for p in problems] == [0, 1, 2, 3]
        for key, field in [("accuracy_strict", "strict"), ("accuracy_lenient", "lenient"), ("format", "format")]:
            assert record[f"eval/{key}"] == mean(p[field] for p in problems)
        if "eval/tool_calls" in record:
            calls = sum(p["tool_calls"] for p in problems)
            assert record["eval/tool_calls"] == calls / 4
            assert record["eval/tool_errors"] == sum(p["tool_errors"] for p in problems) / max(1, calls)


def logged_keys(records: list[dict]) -> set[str]:
    """The keys of metrics.jsonl records, each reward function's as reward/<fn> and maj@/pass@ as @k."""
    return {re.sub(r"@\d+$", "@k", re.sub(r"^reward/.+", "reward/<fn>", k)) for r in records for k in r}


def test_every_logged_key_has_a_row_and_its_tests_exist(logged_run):
    """docs/tests.md's table of logged numbers has a row for every key a run writes to metrics.jsonl (the shared run
    has tools and maj@k, so every key there is), with its definition and the tests that compute it by hand: a new
    key needs a row (and a test), a renamed test its new name there."""
    with open(os.path.join(HERE, "docs", "tests.md")) as f:
        section = f.read().split("## Every logged number")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| (.+) \|$", section, re.M)
    assert sorted(key for key, _, _ in rows) == sorted(logged_keys(logged_run["records"]))
    with open(os.path.join(HERE, "test_grpo.py")) as f:
        defined = set(re.findall(r"^def (test_\w+)", f.read(), re.M))
    for key, definition, tests in rows:
        named = re.findall(r"`(test_\w+)", tests)
        assert definition.strip() and named and set(named) <= defined, (key, set(named) - defined)


# ----------------------------------------------------------------------------- the lookup task: what only the environment knows
LOOKUP_QUESTION = "What is the price of the item in locker 17?"
LOOKUP_ROW = {"question": LOOKUP_QUESTION, "gold": "34", "facts": [["locker 17", "kettle"], ["kettle", "34"],
              ["locker 1", "rake"], ["rake", "27"], ["locker 5", "lamp"], ["lamp", "34"]]}  # fmt: skip
LOOKUP_HONEST = formatted(
    "<lookup>locker 17</lookup><result>kettle</result> <lookup>kettle</lookup><result>34</result>", "34"
)
# (name, completion, what TOOL_REWARD_FUNCS pay: tool_reward, grounded_call, answer_from_call, well_formed)
LOOKUP_ATTACKS = [
    ("guess the answer, right, without a lookup", formatted("prices are often 34", "34"), [0, 0, 0, 0]),
    ("answer a result never asked for", formatted("<result>34</result>", "34"), [0, 0, 0, 0]),
    ("a forged result", formatted("<lookup>locker 17</lookup><result>34</result>", "34"), [0, 0, 0, 0]),
    ("copy a number from the question", formatted("<lookup>17</lookup><result>not found</result>", "17"), [0, 0, 0, 0]),
    ("look up every key you can invent", formatted("".join(f"<lookup>locker {n}</lookup><result>not found</result>"
                                                          for n in (2, 3, 4)), "34"), [0, 0, 0, 0]),  # fmt: skip
    ("an invented key that exists, then its chain",
     formatted("<lookup>locker 5</lookup><result>lamp</result> <lookup>lamp</lookup><result>34</result>", "34"), [0, 0, 0, 1]),
    ("a key inside the question's key (locker 1 in locker 17)",
     formatted("<lookup>locker 1</lookup><result>rake</result> <lookup>rake</lookup><result>27</result>", "27"), [0, 0, 0, 1]),
    ("half the chain, then a guess", formatted("<lookup>locker 17</lookup><result>kettle</result>", "34"), [0, 1, 0, 1]),
    ("the price of an item the question never led to", formatted("<lookup>lamp</lookup><result>34</result>", "34"), [0, 0, 0, 1]),
    ("a calculator call typed under --tools lookup (no calculator answers it)",
     formatted("<calc>17 + 17</calc><result>34</result>", "34"), [0, 0, 0, 0]),
    ("the chain, then another answer",
     formatted("<lookup>locker 17</lookup><result>kettle</result> <lookup>kettle</lookup><result>34</result>", "35"),
     [0, 1, 0, 1]),
]  # fmt: skip


def test_lookup_rewards_pay_only_gathered_information():
    """The tool rewards on the lookup task, attacked: a right answer pays the ladder's top only when a lookup result
    supplied it through a chain of keys read from the question and from earlier results (any case); guessed, invented,
    copied, forged or typed lookups pay at most the first rung, a call that found something. Every attack pays less in
    total than the honest chain, even those whose answer is right. The rewards re-run each lookup against the row's
    own facts: without them (another row) the honest chain is a forged one."""
    funcs = grpo.REWARD_FUNCS + grpo.TOOL_REWARD_FUNCS
    extra = {**{k: v for k, v in LOOKUP_ROW.items() if k != "gold"}, "tools": "lookup"}
    shouting = LOOKUP_HONEST.replace("<lookup>locker 17<", "<lookup>LOCKER  17<")
    for completion in (LOOKUP_HONEST, shouting):
        assert [fn(completion, "34", **extra) for fn, _ in grpo.TOOL_REWARD_FUNCS] == [1, 1, 1, 1]
    no_facts = [fn(LOOKUP_HONEST, "34", question=LOOKUP_QUESTION) for fn, _ in grpo.TOOL_REWARD_FUNCS]
    assert no_facts == [0, 0, 0, 0]
    for name, completion, expected in LOOKUP_ATTACKS:
        assert [fn(completion, "34", **extra) for fn, _ in grpo.TOOL_REWARD_FUNCS] == expected, name
    table = [LOOKUP_HONEST] + [completion for _, completion, _ in LOOKUP_ATTACKS]
    totals, _ = grpo.score(table, [LOOKUP_ROW] * len(table), funcs, [60] * len(table), 128, "lookup")
    assert (totals[1:] < totals[0]).all(), dict(zip(["honest"] + [n for n, *_ in LOOKUP_ATTACKS], totals.tolist()))
    three = {"question": "Locker 8 holds the label of a box. What is the price of the item in that box?",
             "facts": [["locker 8", "box C4"], ["box C4", "vase"], ["vase", "61"]], "tools": "lookup"}  # fmt: skip
    stop_early = formatted("<lookup>locker 8</lookup><result>box C4</result>", "4")  # box C4 does not state 4
    half = formatted(
        "<lookup>locker 8</lookup><result>box C4</result> <lookup>box C4</lookup><result>vase</result>", "60"
    )
    chain = formatted("<lookup>locker 8</lookup><result>box C4</result> <lookup>box C4</lookup><result>vase</result> "
                      "<lookup>vase</lookup><result>61</result>", "61")  # fmt: skip
    paid = {c: [fn(c, "61", **three) for fn, _ in grpo.TOOL_REWARD_FUNCS] for c in (stop_early, half, chain)}
    assert list(paid.values()) == [[0, 1, 0, 1], [0, 1, 0, 1], [1, 1, 1, 1]], paid


def test_lookup_answers_each_completion_from_its_own_rows_facts(tiny_model):
    """The environment answers <lookup> from the facts of the row each completion answers (tool_env's rows, one per
    completion): the same call in two rows gets each row's value, an unknown key 'not found', which tool_use counts
    as a failed call; a model's tokens never reach the facts but through a call."""
    tok = load(tiny_model)[1]
    rows = [LOOKUP_ROW, {**LOOKUP_ROW, "facts": [["locker 17", "anchor"]]}]
    env = grpo.tool_env(tok, 4, "lookup", rows)
    turns = {"ids": [[], []], "queue": [[], []], "calls": [0, 0], "eos": {tok.eos_token_id}}
    written, by_env = [[], []], []
    script = [ids_of(tok, "<lookup>locker 17</lookup>"), ids_of(tok, "<lookup>locker 17</lookup>")]
    steps = max(map(len, script)) + 40
    for t in range(steps):
        own = torch.tensor([ids[t] if t < len(ids) else tok.pad_token_id for ids in script])
        chosen, forced = grpo.environment_turn(env, own, torch.tensor([False, False]), turns)
        for b in range(2):
            written[b] += [chosen[b].item()] if forced[b] else []
        by_env.append(forced)
    assert [tok.decode(w) for w in written] == ["<result>kettle</result>", "<result>anchor</result>"]
    assert grpo.tool_response("<lookup>locker 9</lookup>", "lookup", LOOKUP_ROW) == "<result>not found</result>"
    ids = torch.tensor([ids_of(tok, "<lookup>x</lookup><result>not found</result>")])
    by = torch.zeros_like(ids, dtype=torch.bool)
    by[0, len(ids_of(tok, "<lookup>x</lookup>")) :] = True
    assert grpo.tool_use(tok, ids, torch.tensor([ids.shape[1]]), by) == ([1], [1])


def test_the_lookup_task_needs_its_chain():
    """make_lookup_task.py: every question names a key whose chain through its row's facts (2 or 3 lookups, each
    value the next key) ends at the answer, among distractor chains of the same shape; the seed fixes the files."""
    lookup_task = importlib.import_module("make_lookup_task")
    rng = random.Random(0)
    for steps in [2, 3] * 50:
        row = lookup_task.make_row(rng, steps)
        facts = dict(row["facts"])
        assert len(facts) == len(row["facts"]) == 4 * steps  # 4 chains, no key twice
        key = re.search(r"locker \d+", row["question"].lower()).group()
        for _ in range(steps):
            key = facts[key]
        assert key == row["answer"] and grpo.gold_answer(row["answer"]) == row["answer"]
        assert sum(v.isdigit() for v in facts.values()) == 4  # each chain ends at a price


def test_lookup_task_trains_and_evaluates_end_to_end(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--tools lookup through main on make_lookup_task.py's files, with a tiny model: each completion's environment
    gets its own row's facts, training and evaluation run, and pass_at_kt.py measures pass@(k, T) of the result. A
    dataset without facts is refused in one line."""
    subprocess.run([sys.executable, os.path.join(HERE, "make_lookup_task.py"), "--out", str(tmp_path / "data"),
                    "--train", "16", "--test", "4"], check=True, capture_output=True)  # fmt: skip
    seen, tool_env = [], grpo.tool_env
    monkeypatch.setattr(
        grpo, "tool_env", lambda tok, n, names, rows=None: seen.append(rows) or tool_env(tok, n, names, rows)
    )
    cfg = tiny_config(tiny_model, str(tmp_path / "data"), tmp_path, tools="lookup", eval_size=4, eval_samples=2)
    grpo.main(cfg)
    train = [r for r in read_metrics(cfg) if "reward" in r]
    assert len(train) == 2 and all("tool_calls" in r and "reward/grounded_call_reward" in r for r in train)
    assert all(len(rows) in (cfg.prompts_per_step * cfg.group_size, 2, 4) for rows in seen)
    assert all(row["facts"] and row["question"] for rows in seen for row in rows)  # each its own question's facts
    pass_at_kt = importlib.import_module("pass_at_kt")
    args = argparse.Namespace(ks=[1, 2], dataset=cfg.dataset, tools="lookup", eval_size=4, eval_batch_size=4,
                              max_new_tokens=8, temperature=1.0, device="cpu", seed=0)  # fmt: skip
    row = pass_at_kt.measure(os.path.join(cfg.output_dir, "final"), args, 2, str(tmp_path / "pk"))
    assert row["problems"] == 4 and 0 <= row["pass@1"] <= row["pass@2"] <= 1
    evaluations, main = [], grpo.main  # measured again: read, not rerun, unless a setting differs
    monkeypatch.setattr(grpo, "main", lambda cfg: evaluations.append(cfg) or main(cfg))
    assert pass_at_kt.measure(os.path.join(cfg.output_dir, "final"), args, 2, str(tmp_path / "pk")) == row
    assert evaluations == []
    pass_at_kt.measure(os.path.join(cfg.output_dir, "final"), args, 1, str(tmp_path / "pk"))  # T, then the seed
    pass_at_kt.measure(os.path.join(cfg.output_dir, "final"), argparse.Namespace(**{**vars(args), "seed": 1}), 1,
                       str(tmp_path / "pk"))  # fmt: skip
    assert [(c.max_tool_calls, c.seed) for c in evaluations] == [(1, 0), (1, 1)]
    command = [sys.executable, os.path.join(HERE, "pass_at_kt.py"), "--models", f"a={cfg.output_dir}/final",
               "--dataset", cfg.dataset, "--calls", "0,2", "--ks", "1,2", "--eval_size", "4", "--eval_batch_size", "4",
               "--max_new_tokens", "8", "--device", "cpu", "--out", str(tmp_path / "cli")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "cli" / "pass_at_kt.json") as f:
        assert json.load(f)["results"]["a"]["2"] == row  # the command line measures what measure() measured
    with open(tmp_path / "cli" / "pass_at_kt.md") as f:
        assert [line.split(" | ")[:2] for line in f.read().splitlines()[2:]] == [["| a", "0"], ["| a", "2"]]
    assert os.path.exists(tmp_path / "cli" / "pass_at_kt.png") == bool(importlib.util.find_spec("matplotlib"))
    with pytest.raises(SystemExit, match="^error: --tools lookup answers from each row's facts, and .* no such column"):
        grpo.load_rows(grpo.Config(dataset=tiny_data, tools="lookup"), "train")
