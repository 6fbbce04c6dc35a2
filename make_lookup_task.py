"""make_lookup_task.py: a task whose answers only the environment knows, for grpo.py --tools lookup.

Each question needs 2 dependent lookups (and some 3): the item in a locker, then that item's price; or the box a
locker holds, the item in that box, then its price. The names and numbers are drawn at random for every question
and live only in the row's `facts` column, which the model never sees: a model that does not look things up can
only guess (a price is one of 90 numbers). Answers are numbers, so grpo.py's rubric scores them unchanged.

    python make_lookup_task.py --out data/lookup          # train.jsonl (2,000 rows) and test.jsonl (200 rows)
    python grpo.py --dataset data/lookup --tools lookup ...

A row: {"question": ..., "answer": "34", "facts": [["locker 17", "kettle"], ["kettle", "34"], ...]}, the chain
the question asks for among distractor chains of the same shape, so that a guessed key finds a wrong answer.
"""

import argparse
import json
import os
import random

ITEMS = """anchor apron basket blanket bottle bucket candle carpet chisel clock compass cushion drill easel
fan flask globe guitar hammer helmet jacket kettle ladder lamp lantern mirror mug napkin needle notebook pan
pillow plate pliers pot puzzle radio rake ribbon rope ruler saw scarf scissors shovel spoon stapler stool
sweater teapot tent torch towel trowel tray umbrella vase wallet whistle wrench""".split()


def make_row(rng: random.Random, steps: int, chains: int = 4) -> dict:
    """One question of `steps` dependent lookups, with `chains - 1` distractor chains of the same shape."""
    lockers = rng.sample(range(1, 100), chains)
    boxes = rng.sample([f"box {c}{d}" for c in "ABCDEFGH" for d in range(1, 10)], chains)
    items = rng.sample(ITEMS, chains)
    facts, prices = [], [str(rng.randint(10, 99)) for _ in range(chains)]
    for locker, box, item, price in zip(lockers, boxes, items, prices):
        hops = [f"locker {locker}"] + ([box] if steps == 3 else []) + [item, price]  # each value is the next key
        facts += [[key, value] for key, value in zip(hops, hops[1:])]
    rng.shuffle(facts)
    question = (
        f"What is the price of the item in locker {lockers[0]}?"
        if steps == 2
        else f"Locker {lockers[0]} holds the label of a box. What is the price of the item in that box?"
    )
    return {"question": question, "answer": prices[0], "facts": facts}  # the first chain is the one asked for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/lookup", help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="train questions")
    parser.add_argument("--test", type=int, default=200, help="test questions")
    parser.add_argument("--three_step", type=float, default=0.3, help="share of questions that need 3 lookups")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        rows = [make_row(rng, 3 if rng.random() < args.three_step else 2) for _ in range(n)]
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{os.path.join(args.out, split + '.jsonl')}: {n} questions")


if __name__ == "__main__":
    main()
