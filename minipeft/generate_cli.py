"""`minipeft generate`: greedy or sampled continuation from a checkpoint directory."""
from __future__ import annotations

import argparse

import torch

from .argtypes import at_least, device, finite_float, nonempty, probability
from .checkpoint import load_pretrained, read_config
from .distributed import use_device
from .generation_config import stop_token_ids
from .train_config import MAX_SEED


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """--ids' comma-separated token ids, each an integer in [0, vocab_size), else a ValueError
    naming it (the embedding lookup would fail with an IndexError that names nothing)."""
    ids = []
    for item in text.split(","):
        try:
            i = int(item)
        except ValueError:
            raise ValueError(f"--ids: {item.strip()!r} is not an integer token id") from None
        if not 0 <= i < vocab_size:
            raise ValueError(f"--ids: token id {i} is outside the model's vocabulary of {vocab_size} "
                             f"(ids 0 to {vocab_size - 1})")
        ids.append(i)
    return ids


def _generate(args: argparse.Namespace) -> int:
    from .job import default_model_dir

    path, device = default_model_dir(args.model), use_device(args.device)
    config, tok = read_config(path), None  # the prompt and the files are checked before the weights load
    eos = stop_token_ids(path, config.vocab_size, config.eos_token_id)
    if args.prompt is not None:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        prompt = tok.encode(args.prompt, bos=tok.add_bos_token, eos=tok.add_eos_token)  # as transformers' encode()
    else:
        prompt = parse_ids(args.ids, config.vocab_size)
    room = config.max_position_embeddings - len(prompt)
    if room < 1:  # "use at most 0" of a flag that takes >= 1 would say nothing
        source = "--prompt" if args.prompt is not None else "--ids"
        raise ValueError(f"{source}: the prompt ({len(prompt)} tokens) fills the model's context of "
                         f"{config.max_position_embeddings} tokens: nothing can be generated after it")
    if args.max_new_tokens > room:  # positions past the context were never trained: the text degrades
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt ({len(prompt)} tokens) + "
                         f"{args.max_new_tokens} exceeds the model's context of {config.max_position_embeddings} "
                         f"tokens; use at most {room}")
    model, ids = load_pretrained(path, device=device), torch.tensor([prompt], device=device)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=eos,
                         generator=torch.Generator(device).manual_seed(args.seed))  # draws where the logits are
    new = out[0, ids.shape[1]:].tolist()
    if tok is None:
        print(",".join(map(str, new)))
    else:  # what the tokens add to the prompt's text: decoded alone, the first word would lose its space
        print(tok.decode(prompt + new)[len(tok.decode(prompt)):])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint directory")
    g.add_argument("--model", type=nonempty("a model directory"), help="Hugging Face model directory (default: the shipped base model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (needs tokenizer.model in the model directory)")
    src.add_argument("--ids", type=nonempty("comma-separated token ids"), help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=at_least(1), default=32)
    g.add_argument("--temperature", type=finite_float(0), default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=at_least(1))
    g.add_argument("--top-p", type=probability)
    g.add_argument("--seed", type=at_least(0, MAX_SEED), default=0)
    g.add_argument("--device", type=device, default="auto", help="auto (a GPU if torch sees one, else the CPU), cpu, cuda, cuda:N")
    g.set_defaults(func=_generate)
