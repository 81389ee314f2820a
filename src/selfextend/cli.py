"""``selfextend`` command line: info, ask, demo. Thin argparse over library calls."""

from __future__ import annotations

import argparse
import sys
import time

import torch

DEMO_LENGTH = 12000  # tokens: past the 8192 trained context; about 45 s per prefill on 2 CPU cores
DEMO_DEPTH = 0.3  # measured: vanilla fails, SelfExtend G=4 W=1024 answers (see README)
DEMO_GROUP, DEMO_WINDOW = 4, 1024


def _load(args):
    import selfextend

    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model or selfextend.models.DEFAULT_MODEL_NAME} ({args.dtype}) ...", file=sys.stderr)
    return selfextend.load_model(args.model, dtype=dtype)


def cmd_info(args) -> int:
    from .config import trained_length_of
    from .positions import max_reach, recommended_group_size, recommended_window

    model, _ = _load(args)
    cfg = model.config
    L = trained_length_of(cfg)
    print(f"model_type:        {cfg.model_type}")
    print(f"trained length L:  {L}")
    print(f"rope_parameters:   {cfg.rope_parameters}")
    print(f"heads / kv heads:  {cfg.num_attention_heads} / {cfg.num_key_value_heads}, head_dim {getattr(cfg, 'head_dim', None)}")
    print("\nreach (L - W) * G + W:")
    windows = [w for w in (512, 1024, 2048) if w < L]
    print("  G \\ W " + "".join(f"{w:>9}" for w in windows))
    for g in (2, 4, 8, 16, 32):
        print(f"  {g:>5} " + "".join(f"{max_reach(L, w, g):>9}" for w in windows))
    W = recommended_window(L)
    print(f"\nrecommended settings (authors' rule W + (N - W) / G <= 2/3 L, W = {W}):")
    for n in args.target_length or [2 * L, 4 * L, 8 * L]:
        g = recommended_group_size(n, L, W)
        print(f"  target {n:>7}: group_size={g:<3} window={W}  (reach {max_reach(L, W, g)})")
    return 0


def _apply_from_args(model, args) -> None:
    import selfextend

    if args.no_extend:
        return
    if args.group_size or args.window:
        selfextend.apply(model, group_size=args.group_size, window=args.window, target_length=args.target_length,
                         backend=args.backend)
    else:
        selfextend.apply(model, target_length=args.target_length, backend=args.backend)


def cmd_ask(args) -> int:
    from .generation import greedy_answer

    model, tokenizer = _load(args)
    with open(args.file, encoding="utf-8") as f:
        document = f.read()
    prompt = f"{document}\n\n{args.question}\n"
    if tokenizer.chat_template and not args.raw:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{document}\n\n{args.question}"}], tokenize=False, add_generation_prompt=True
        )
    n_tokens = len(tokenizer(prompt).input_ids)
    if args.target_length is None and not args.no_extend:
        args.target_length = max(n_tokens + args.max_new_tokens, 1)
    if not args.no_extend and not (args.group_size or args.window) and args.target_length <= model.config.max_position_embeddings:
        print(f"{n_tokens} prompt tokens fit the trained context: running vanilla attention", file=sys.stderr)
        args.no_extend = True
    _apply_from_args(model, args)
    answer = greedy_answer(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, stream=sys.stdout)
    print()
    print(
        f"[{answer.prompt_tokens} prompt tokens, prefill {answer.prefill_seconds:.1f} s, "
        f"{answer.new_tokens} new tokens at {answer.tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args) -> int:
    import selfextend

    from .generation import greedy_answer
    from .tasks.passkey import make_passkey, score_passkey

    model, tokenizer = _load(args)
    sample = make_passkey(tokenizer, args.length, args.depth, seed=args.seed)
    L = model.config.max_position_embeddings
    print(f"passkey haystack: {sample.n_tokens} tokens (trained context {L}), key {sample.expected[0]} at depth {sample.depth}")
    rows = []
    for label in ("vanilla", f"SelfExtend G={DEMO_GROUP} W={DEMO_WINDOW}"):
        if label == "vanilla":
            selfextend.remove(model)
        else:
            selfextend.apply(model, group_size=DEMO_GROUP, window=DEMO_WINDOW)
        t = time.perf_counter()
        ans = greedy_answer(model, tokenizer, sample.prompt, max_new_tokens=8)
        ok = score_passkey(ans.text, sample.expected[0])
        rows.append((label, ans, ok, time.perf_counter() - t))
        print(f"  {label:<24} answer {ans.text.strip()!r:<28} {'RIGHT' if ok else 'wrong'}  "
              f"prefill {ans.prefill_seconds:.1f} s, decode {ans.tokens_per_second:.1f} tokens/s")
    print(f"\nexpected {sample.expected[0]}; length {sample.n_tokens} tokens; depth {sample.depth}")
    van, se = rows[0], rows[1]
    print(f"prefill time SelfExtend / vanilla: {se[1].prefill_seconds / van[1].prefill_seconds:.2f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .backends import available_backends

    parser = argparse.ArgumentParser(prog="selfextend", description="Training-free context extension (SelfExtend).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="model dir, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    p = sub.add_parser("info", help="trained length, RoPE settings, reach and recommended G/W")
    common(p)
    p.add_argument("--target-length", type=int, action="append", help="lengths to recommend settings for")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ask", help="answer a question about a long document")
    common(p)
    p.add_argument("question")
    p.add_argument("--file", required=True)
    p.add_argument("--target-length", type=int, default=None)
    p.add_argument("-G", "--group-size", type=int, default=None)
    p.add_argument("-W", "--window", type=int, default=None)
    p.add_argument("--no-extend", action="store_true", help="vanilla attention")
    p.add_argument("--backend", default="auto", choices=available_backends())
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("demo", help="passkey past the trained length: vanilla vs SelfExtend")
    common(p)
    p.add_argument("--length", type=int, default=DEMO_LENGTH)
    p.add_argument("--depth", type=float, default=DEMO_DEPTH)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
