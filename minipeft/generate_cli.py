"""`minipeft generate`: greedy or sampled continuation from a checkpoint directory, and
`minipeft demo`, the README's main job (until the trainer lands: save, reload and generate)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_pretrained
from .config import ModelConfig
from .model import Transformer


def _generate(args: argparse.Namespace) -> int:
    model = load_pretrained(args.model)
    if args.prompt is not None:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(args.model)
        ids = torch.tensor([tok.encode(args.prompt, bos=True)])
    else:
        tok, ids = None, torch.tensor([[int(i) for i in args.ids.split(",")]])
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=model.config.eos_token_id,
                         generator=torch.Generator().manual_seed(args.seed))
    new = out[0, ids.shape[1]:].tolist()
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(Path(d) / "tiny")
        loaded = load_pretrained(Path(d) / "tiny")
    prompt = torch.tensor([[1, 17, 42, 99, 7]])
    t0 = time.perf_counter()
    cached = loaded.generate(prompt, 16)
    uncached = loaded.generate(prompt, 16, use_cache=False)
    print(f"tiny random LLaMA ({sum(p.numel() for p in loaded.parameters()):,} params), saved and reloaded")
    print("prompt ids:   ", prompt[0].tolist())
    print("greedy tokens:", cached[0, 5:].tolist())
    print(f"KV cache == recompute: {torch.equal(cached, uncached)} ({time.perf_counter() - t0:.2f}s)")
    return 0 if torch.equal(cached, uncached) else 1


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint directory")
    g.add_argument("--model", required=True, help="Hugging Face model directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (needs tokenizer.model in the model directory)")
    src.add_argument("--ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)
    sub.add_parser("demo", help="the README's main job").set_defaults(func=_demo)
