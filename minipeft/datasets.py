"""minipeft's bundled fine-tuning datasets: three synthetic tasks, one for each reason the outline
(section 1.2) gives for fine-tuning rather than RAG or prompting, written to datasets/ by

    minipeft datasets build [--output DIR] [--seed N]

    task          format         outline row            train/test  metric (minipeft.evaluate)
    json_extract  instruction    formatted output       600/100     exact_match (JSON compared parsed)
    sentiment     conversations  simple classification  300/60      accuracy (balanced classes)
    style         messages       specific writing style 500/80      rougeL, bleu, exact_match

They are sized for a tiny (5-15M parameter) model tuned in minutes: prompt + reply well under 96
tokens, one fixed structure per task, and every reply a function of its prompt:
- json_extract: reply = person_json(name, age, city), values copied from a sentence in one of
  JSON_TEMPLATES, one example per person. Test people are full names never seen in training
  (their first and last names are), so a model must copy rather than recall.
- sentiment: a review of 1-2 clauses built from the phrase lists; label = "positive" when a
  POSITIVE phrase is present, "negative" when a NEGATIVE one is, "neutral" when every phrase is
  NEUTRAL (a review never mixes positive and negative). Neutral clauses also appear in the
  other classes, so the label depends on the polarity words, not on the review's shape.
- style: reply = telegram(user message), a deterministic rewrite (see `telegram`).

Splits: prompts are distinct within a file (dedup.prompt_key), and no test prompt is an exact or
near duplicate (Jaccard similarity of character 5-grams >= dedup.NEAR_THRESHOLD = 0.8) of a train
prompt, so `minipeft data report TRAIN --test TEST` finds no leakage. The price: test examples are
a little further from train than a random split's would be (held out, not merely unseen).

Determinism: all randomness is one random.Random(seed) drawing from fixed lists in a fixed order,
and lines are written with json.dumps, so the same seed gives the same bytes on every machine.
tasks.json names each task's files (relative to the parent of the output folder: the repository
root for the default `--output datasets`), format, task kind (minipeft.evaluate.TASKS), metrics
and a one-line description. tests/test_datasets.py checks all of the above.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from .argtypes import at_least, nonempty
from .data.dedup import NEAR_THRESHOLD, prompt_key, shingles
from .data.formats import Example, detect_format, normalize
from .files import check_output_dir
from .data.jsonl import dumps_line, write_atomic
from .train_config import MAX_SEED

Record = dict[str, Any]
Splits = tuple[list[Record], list[Record]]  # (train, test)

# --- json_extract -------------------------------------------------------------------------------
JSON_INSTRUCTION = "Extract the person as JSON."
JSON_KEYS = ("name", "age", "city")
JSON_SEPARATORS = (", ", ": ")  # json.dumps' default look, fixed here so every reply is byte-identical
# No word of a name or city begins another ("Berg" / "Bergen"): a tiny model trained on such lists
# completed one with the other.
FIRST_NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Lars", "Wei", "Nora", "Omar",
               "Ingrid", "Carlos", "Yuki", "Anna", "Ravi", "Lucia", "Jonas", "Amara", "Pablo", "Elena", "Samir",
               "Grace", "Felix", "Mina", "David", "Sofia", "Ivan", "Leila", "Hugo")
LAST_NAMES = ("Lopez", "Berg", "Okafor", "Tanaka", "Novak", "Silva", "Khan", "Jensen", "Rossi", "Murphy",
              "Kowalski", "Nguyen", "Schmidt", "Dubois", "Haddad", "Moreau", "Costa", "Lindgren", "Ortiz", "Fischer",
              "Mensah", "Park", "Walsh", "Romero", "Patel", "Holm", "Garcia", "Ahmed", "Weber", "Santos")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Cairo", "Dublin", "Quito", "Hanoi", "Perth", "Porto",
          "Bologna", "Austin", "Denver", "Munich", "Krakow", "Seville", "Accra", "Dakar", "Manila", "Seoul", "Boston",
          "Toronto", "Madrid", "Vienna", "Prague", "Athens", "Zurich", "Milan", "Naples", "New York", "Cape Town",
          "New Delhi", "Los Angeles", "Hong Kong", "Las Vegas")
JSON_TEMPLATES = ("{name}, {age}, lives in {city}.", "In {city} lives {name}, aged {age}.",
                  "{name} is {age} years old and lives in {city}.", "{name} ({age}) is from {city}.",
                  "Meet {name} from {city}, who is {age}.", "{city} is home to {name}, age {age}.",
                  "At {age}, {name} moved to {city}.", "Name: {name}. Age: {age}. City: {city}.",
                  "{name} from {city} turned {age} this year.")
AGES = (18, 90)  # inclusive

# --- sentiment ----------------------------------------------------------------------------------
SENTIMENT_PROMPT = "Is this review positive, negative or neutral?\n\n"
PRODUCTS = ("kettle", "lamp", "chair", "backpack", "blender", "jacket", "printer", "keyboard", "mug", "tent",
            "camera", "headset", "watch", "desk", "toaster", "umbrella")
PRODUCT_SUBJECTS = ("The {}", "This {}", "My new {}")
POSITIVE = ("works perfectly", "is excellent", "is a great buy", "exceeded my expectations", "is very comfortable",
            "was worth every penny", "is sturdy and well made", "looks beautiful", "is fantastic",
            "does its job brilliantly")
NEGATIVE = ("broke after a week", "is terrible", "stopped working", "is a waste of money", "feels cheap and flimsy",
            "is very disappointing", "arrived damaged", "is awful", "keeps failing", "fell apart quickly")
NEUTRAL = ("arrived on a Tuesday", "is blue", "came in a cardboard box", "is the size I expected", "is grey",
           "is average", "is okay", "has two buttons", "weighs about a kilo", "comes with a manual")
PHRASES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}  # label -> its phrases

# --- style --------------------------------------------------------------------------------------
STYLE_SYSTEM = "Rewrite in telegram style."
ARTICLES = frozenset({"a", "an", "the"})
SUBJECTS = ("The train", "The package", "A letter", "The doctor", "My brother", "Our ship", "The meeting",
            "Your order", "The storm", "An old friend", "The ticket", "My sister", "The new manager", "The contract",
            "The car", "Our team")
PREDICATES = ("arrives", "leaves", "is delayed", "was cancelled", "is ready", "will come", "starts", "ends",
              "returns", "is waiting")
WHEN = ("at noon", "tonight", "tomorrow", "in the morning", "after the holiday", "at the station",
        "before the weekend", "by the end of the month", "at the harbour", "next week")
ORDERS = ("Send the money.", "Meet me at the station.", "Call the office.", "Bring an umbrella.", "Wait for a reply.",
          "Book a room at the hotel.", "Tell the family.", "Sell the car.", "Come home at once.",
          "Keep the letter safe.", "Buy the tickets.", "Pay the rent.")

SIZES = {"json_extract": (600, 100), "sentiment": (300, 60), "style": (500, 80)}  # (train, test)
TASKS = {  # what tasks.json says about each task, beside its files
    "json_extract": {"format": "instruction", "task": "json", "metric": "exact_match",
                     "metrics": ["exact_match", "valid_json_rate", "required_fields_present"],
                     "description": "Extract name, age and city from a sentence as strict JSON (formatted output)."},
    "sentiment": {"format": "conversations", "task": "classification", "metric": "accuracy",
                  "metrics": ["accuracy", "invalid_label_rate"],
                  "description": "Label a short product review positive, negative or neutral (simple classification)."},
    "style": {"format": "messages", "task": "generation", "metric": "rougeL",
              "metrics": ["rougeL", "bleu", "exact_match"],
              "description": "Rewrite a plain message in telegram style (a specific writing style)."},
}


def person_json(name: str, age: int, city: str) -> str:
    """The json_extract reply: {"name": ..., "age": ..., "city": ...} in that key order, age an integer."""
    return json.dumps(dict(zip(JSON_KEYS, (name, age, city))), separators=JSON_SEPARATORS)


def telegram(text: str) -> str:
    """Telegram style: for each sentence s_i of `text` (split at . ! ?), its words (runs of letters,
    digits and apostrophes), lowercased, minus the articles a/an/the, then " STOP":

        telegram(s_1 ... s_k) = " ".join(words(s_i) - ARTICLES + ["STOP"] for i = 1..k)

    e.g. "The train arrives at noon. Meet me at the station." ->
         "train arrives at noon STOP meet me at station STOP".
    Lowercase rather than the telegram's capitals: to a SentencePiece vocabulary learned on
    ordinary text a word in capitals is a run of single-letter pieces (1.6x the tokens of the
    lowercase reply with a 4k vocabulary trained on Python's docs), which would turn a style
    lesson into a spelling lesson for a tiny model.
    """
    sentences = [s for s in re.split(r"[.!?]", text) if s.strip()]
    return " ".join(" ".join([w for w in re.findall(r"[a-z0-9']+", s.lower()) if w not in ARTICLES] + ["STOP"])
                    for s in sentences)


def _json_record(rng: random.Random, people: Iterator[str]) -> Record:
    name, age, city = next(people), rng.randint(*AGES), rng.choice(CITIES)
    return {"instruction": JSON_INSTRUCTION, "input": rng.choice(JSON_TEMPLATES).format(name=name, age=age, city=city),
            "output": person_json(name, age, city)}


def _sentiment_record(rng: random.Random, label: str) -> Record:
    """A review of 1-2 clauses: one of `label` (first or second), the other (if any) of `label` or neutral."""
    clauses = [rng.choice(PHRASES[label])]
    if rng.random() < 0.6:
        clauses.append(rng.choice([p for p in PHRASES[rng.choice((label, "neutral"))] if p != clauses[0]]))
        rng.shuffle(clauses)
    subject = rng.choice(PRODUCT_SUBJECTS).format(rng.choice(PRODUCTS))
    review = " ".join(f"{who} {what}." for who, what in zip((subject, "It"), clauses))
    return {"conversations": [{"role": "user", "content": SENTIMENT_PROMPT + review},
                              {"role": "assistant", "content": label}]}


def _style_record(rng: random.Random) -> Record:
    """A statement, a statement and an order, or an order and a statement, with its telegram."""
    statement = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)} {rng.choice(WHEN)}."
    shape = rng.randrange(3)
    text = statement if shape == 0 else f"{statement} {rng.choice(ORDERS)}" if shape == 1 else \
        f"{rng.choice(ORDERS)} {statement}"
    return {"messages": [{"role": "system", "content": STYLE_SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": telegram(text)}]}


def _prompt_key(record: Record) -> str:
    """The record's prompt as the data tools compare prompts (dedup.prompt_key of the loaded example)."""
    fmt, _ = detect_format(record)
    messages, _ = normalize(record, fmt)
    return prompt_key(Example("", 0, messages, record, fmt))


def _near(a: frozenset[int], b: frozenset[int]) -> bool:
    """J(a, b) >= NEAR_THRESHOLD (dedup.py), as |a & b| >= t * (|a| + |b| - |a & b|): one set
    operation instead of two, since this runs ~10^5 times per build."""
    common = len(a & b)
    return common >= NEAR_THRESHOLD * (len(a) + len(b) - common)


def _distinct(draw: Callable[[random.Random], Record], n: int, rng: random.Random,
              far_from: Iterable[str] = ()) -> dict[str, Record]:
    """n records from draw(rng), prompt key -> record: distinct prompts, none a near duplicate
    (Jaccard similarity >= NEAR_THRESHOLD, what `minipeft data report --test` calls leakage) of `far_from`."""
    far = [shingles(key) for key in far_from]
    found: dict[str, Record] = {}
    for _ in range(100 * n):  # the lists allow thousands of prompts; running out means they were cut
        record = draw(rng)
        key = _prompt_key(record)
        grams = shingles(key)
        if key not in found and not any(_near(grams, s) for s in far):
            found[key] = record
            if len(found) == n:
                return found
    raise RuntimeError(f"could draw only {len(found)} of the {n} distinct prompts needed; lengthen the word lists")


def _split(draw_train: Callable[[random.Random], Record], draw_test: Callable[[random.Random], Record],
           n_train: int, n_test: int, rng: random.Random) -> Splits:
    train = _distinct(draw_train, n_train, rng)
    return list(train.values()), list(_distinct(draw_test, n_test, rng, train).values())


def _json_splits(rng: random.Random) -> Splits:
    """One example per person, so a first name says nothing about the last name that follows it and
    the model must copy both. Test people are full names that training never shows (their first and
    last names it does). Of the 900 people, 200 are kept for test: room for test draws rejected as
    near duplicates of a train prompt (none for seed 0)."""
    people = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(people)
    n_train, n_test = SIZES["json_extract"]
    test_people, train_people = iter(people[:2 * n_test]), iter(people[2 * n_test:])
    return _split(partial(_json_record, people=train_people), partial(_json_record, people=test_people), n_train,
                  n_test, rng)


def _sentiment_splits(rng: random.Random) -> Splits:
    """Balanced: each label gets the same number of train and of test reviews."""
    n_train, n_test = (n // len(PHRASES) for n in SIZES["sentiment"])
    train: dict[str, Record] = {}
    for label in PHRASES:
        train.update(_distinct(partial(_sentiment_record, label=label), n_train, rng))
    test = [record for label in PHRASES
            for record in _distinct(partial(_sentiment_record, label=label), n_test, rng, train).values()]
    train_records = list(train.values())
    rng.shuffle(train_records)  # labels interleaved, as a shuffled training file would be
    rng.shuffle(test)
    return train_records, test


def _style_splits(rng: random.Random) -> Splits:
    return _split(_style_record, _style_record, *SIZES["style"], rng)


def generate_tasks(seed: int = 0) -> dict[str, Splits]:
    """Task name -> (train records, test records), the same for the same seed."""
    rng = random.Random(seed)
    return {"json_extract": _json_splits(rng), "sentiment": _sentiment_splits(rng), "style": _style_splits(rng)}


def build_datasets(output: Union[str, Path] = "datasets", seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write OUTPUT/<task>/{train,test}.jsonl and OUTPUT/tasks.json (each file atomically); return tasks.json's
    content. Its paths are relative to OUTPUT's parent: "datasets/json_extract/train.jsonl" for the default."""
    out = Path(output)
    tasks = {}
    for name, splits in generate_tasks(seed).items():
        files = {}
        for split, records in zip(("train", "test"), splits):
            write_atomic(out / name / f"{split}.jsonl", (dumps_line(r) for r in records))
            files[split] = f"{out.resolve().name}/{name}/{split}.jsonl"
        tasks[name] = {**files, **TASKS[name]}
    write_atomic(out / "tasks.json", [(json.dumps(tasks, indent=2) + "\n").encode("ascii")])
    return tasks


def read_tasks(path: Union[str, Path] = "datasets/tasks.json") -> dict[str, dict[str, Any]]:
    """tasks.json with its train/test paths made absolute (they are relative to the parent of its folder)."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the task list ({e}); `minipeft datasets build` writes it") from None
    root = path.resolve().parent.parent
    out = {}
    for name, entry in tasks.items() if isinstance(tasks, dict) else [("(top level)", tasks)]:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("train", "test"))):
            raise ValueError(f"{path}: {name}: expected an object with \"train\" and \"test\" paths (strings), "
                             f"got {json.dumps(entry)[:80]}")
        out[name] = {**entry, "train": str(root / entry["train"]), "test": str(root / entry["test"])}
    return out


def register(subparsers: Any) -> None:
    datasets = subparsers.add_parser("datasets", help="the bundled fine-tuning datasets",
                                     description="minipeft's bundled fine-tuning datasets (datasets/README.md)")
    sub = datasets.add_subparsers(dest="datasets_command", required=True, metavar="{build}")
    build = sub.add_parser("build", help="(re)generate the datasets: <task>/{train,test}.jsonl and tasks.json")
    build.add_argument("--output", type=nonempty("a directory"), default="datasets", metavar="DIR", help="where they go (default: datasets)")
    # random.Random(-n) draws as random.Random(n): a negative seed would alias another
    build.add_argument("--seed", type=at_least(0, MAX_SEED), default=0, help="random seed (default: 0, the committed files)")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    check_output_dir(args.output, "--output")  # named now, not as a write error halfway through the tasks
    for name, entry in build_datasets(args.output, args.seed).items():
        train, test = SIZES[name]
        print(f"{name}: {train} train / {test} test ({entry['format']}, {entry['metric']}) -> "
              f"{Path(args.output) / name}")
    print(f"wrote {Path(args.output) / 'tasks.json'}")
    return 0
