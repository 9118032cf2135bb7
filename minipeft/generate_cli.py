"""`minipeft generate`: greedy or sampled continuation from a checkpoint directory."""
from __future__ import annotations

import argparse

import torch

from .argtypes import at_least, probability
from .checkpoint import load_pretrained
from .distributed import use_device


def _generate(args: argparse.Namespace) -> int:
    from .job import default_model_dir

    path, device = default_model_dir(args.model), use_device(args.device)
    model = load_pretrained(path, device=device)
    if args.prompt is not None:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        ids = torch.tensor([tok.encode(args.prompt, bos=True)], device=device)
    else:
        tok, ids = None, torch.tensor([[int(i) for i in args.ids.split(",")]], device=device)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=model.config.eos_token_id,
                         generator=torch.Generator(device).manual_seed(args.seed))  # draws where the logits are
    new = out[0, ids.shape[1]:].tolist()
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint directory")
    g.add_argument("--model", default="", help="Hugging Face model directory (default: the shipped base model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (needs tokenizer.model in the model directory)")
    src.add_argument("--ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=at_least(1), default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=at_least(1))
    g.add_argument("--top-p", type=probability)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (a GPU if torch sees one, else the CPU), cpu, cuda, cuda:N")
    g.set_defaults(func=_generate)
