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
    print(f"heads / kv heads:  {cfg.num_attention_heads} / {cfg.num_key_value_heads}, "
          f"head_dim {getattr(cfg, 'head_dim', None)}")
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
        selfextend.apply(model, group_size=args.group_size, window=args.window,
                         target_length=args.target_length, backend=args.backend)
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
            [{"role": "user", "content": f"{document}\n\n{args.question}"}], tokenize=False,
            add_generation_prompt=True
        )
    n_tokens = len(tokenizer(prompt).input_ids)
    if args.target_length is None and not args.no_extend:
        args.target_length = max(n_tokens + args.max_new_tokens, 1)
    if (not args.no_extend and not (args.group_size or args.window)
            and args.target_length <= model.config.max_position_embeddings):
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

    from .eval.tasks.passkey import make_passkey, score_passkey
    from .generation import greedy_answer

    model, tokenizer = _load(args)
    sample = make_passkey(tokenizer, args.length, args.depth, seed=args.seed)
    L = model.config.max_position_embeddings
    print(f"passkey haystack: {sample.n_tokens} tokens (trained context {L}), "
          f"key {sample.expected[0]} at depth {sample.depth}")
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


def cmd_methods(args) -> int:
    from .methods import METHODS

    for method in METHODS.values():
        print(f"{method.name:<12} {method.summary}")
        for p in method.params:
            default = "derived" if p.default is None else repr(p.default)
            print(f"    {p.name:<18} {p.type.__name__:<6} default {default:<8} {p.help}")
    print("\nselect with --methods NAME or NAME:key=value:key=value, "
          "e.g. self-extend:G=4:W=1024, yarn:factor=4")
    return 0


def cmd_eval(args) -> int:
    from .eval.report import markdown, plot, write_results
    from .eval.runner import EvalConfig, parse_depths, parse_length, parse_method, run_eval
    from .eval.tasks import TASKS

    task = TASKS.get(args.task)
    methods = [parse_method(m) for m in args.methods.split(",") if m.strip()]
    lengths = [parse_length(n) for n in args.lengths.split(",") if n.strip()]
    task_args = {}
    if task.kind == "ppl":
        task_args = {"corpus": args.corpus, "mode": args.mode, "bucket": args.bucket}
        if args.mode == "sliding":
            task_args.update(window=args.window, stride=args.stride)
    config = EvalConfig(args.task, methods, lengths, parse_depths(args.depths), args.samples, args.seed,
                        task_args, args.model or "embedded:SmolLM2-135M-Instruct", args.dtype)
    model, tokenizer = _load(args)
    run_eval(model, tokenizer, config, args.out)
    result = write_results(args.out, args.task, config={
        "task": args.task, "methods": [m.label for m in methods], "lengths": lengths, "depths": config.depths,
        "samples": args.samples, "seed": args.seed, "task_args": task_args, "model": config.model_name,
        "dtype": args.dtype, "threads": torch.get_num_threads()})
    print(markdown(result, args.task))
    if not args.no_plots:
        try:
            for path in plot(args.out, args.task, result):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError as exc:
            print(f"no plots: {exc}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from .eval.report import report

    print(report(args.dir, args.task, plots=not args.no_plots))
    return 0


def _serve_method(model, args) -> str:
    """Apply the method the flags ask for; returns the hint a too-long request gets."""
    import selfextend

    from .config import trained_length_of

    if args.method and (args.group_size or args.window or args.no_extend):
        raise ValueError("--method takes the place of -G/-W/--no-extend; give one of them")
    if args.no_extend and (args.group_size or args.window or args.target_length):
        raise ValueError("--no-extend serves the model as trained; drop -G/-W/--target-length, "
                         "or --no-extend")
    if args.no_extend:
        return "the server runs the model as trained (--no-extend); restart it without --no-extend"
    target = args.target_length or 4 * trained_length_of(model.config)
    if args.method:
        from .eval.runner import parse_method

        spec = parse_method(args.method)
        selfextend.apply(model, method=spec.name, target_length=target, **spec.params)
        return "restart the server with a larger --target-length"
    if args.group_size or args.window:
        selfextend.apply(model, group_size=args.group_size, window=args.window,
                         target_length=args.target_length, backend=args.backend)
        return "restart the server with a larger -G (group size)"
    selfextend.apply(model, target_length=target, backend=args.backend)
    return "restart the server with a larger --target-length"


def cmd_serve(args) -> int:
    import logging
    from pathlib import Path

    from .serve import require

    require()
    import uvicorn

    import selfextend

    from .serve.app import create_app
    from .serve.engine import Engine

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; use 1..65535 (0: any free port)")
    if args.cache_mb < 0 or args.max_queue < 1:
        raise ValueError("--cache-mb must be >= 0 and --max-queue >= 1")
    model, tokenizer = _load(args)
    hint = _serve_method(model, args)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("selfextend").setLevel(logging.INFO)
    engine = Engine(model, tokenizer, cache_bytes=args.cache_mb * 2**20, extend_hint=hint)
    name = args.name or (Path(args.model).stem if args.model else "SmolLM2-135M-Instruct")
    app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue)
    active = selfextend.active(model)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1, reading up to {engine.reach} tokens "
          f"({'vanilla' if active is None else active.name}); Ctrl-C stops", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=args.grace)
    return 0


def cmd_tune(args) -> int:
    from .eval.tune import tune

    model, tokenizer = _load(args)
    tune(model, tokenizer, args.target_length, budget_minutes=args.budget_minutes, depths=args.depths,
         seed=args.seed, out=args.out, save=not args.no_save, max_candidates=args.max_candidates)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .backends import available_backends

    parser = argparse.ArgumentParser(prog="selfextend",
                                     description="Training-free context extension (SelfExtend).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None,
                       help="model dir, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
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

    p = sub.add_parser("methods", help="list the context-extension methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("eval",
                       help="run a task over methods x lengths x depths; resumable JSONL, tables, plots")
    common(p)
    p.add_argument("task", help="passkey, niah, niah_single, ..., ppl (see selfextend.eval.tasks.TASKS)")
    p.add_argument("--methods", default="vanilla,self-extend", help="comma list; NAME or NAME:key=value:...")
    p.add_argument("--lengths", default="4k,8k,16k", help="comma list of lengths in tokens (4k = 4096)")
    p.add_argument("--depths", default="5", help="a count (evenly 0.05..0.95) or a comma list of fractions")
    p.add_argument("--samples", type=int, default=1, help="samples per cell (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results directory; re-running with it resumes")
    p.add_argument("--corpus", default="pydoc", help="ppl: pydoc, stdlib, essays or a text file path")
    p.add_argument("--mode", default="single-pass", choices=["single-pass", "sliding"], help="ppl mode")
    p.add_argument("--bucket", type=int, default=2048, help="ppl: tokens per position bucket")
    p.add_argument("--window", type=int, default=None, help="ppl sliding: window tokens")
    p.add_argument("--stride", type=int, default=None, help="ppl sliding: stride tokens")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="re-render tables and plots from a results directory")
    p.add_argument("dir")
    p.add_argument("--task", action="append", default=None,
                   help="only these tasks (default: every samples file)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tune", help="pick group_size and window for a model and length from a seeded sweep")
    common(p)
    p.add_argument("--target-length", type=int, required=True)
    p.add_argument("--budget-minutes", type=float, default=30.0)
    p.add_argument("--depths", default="0.1,0.5,0.9", help="passkey probe depths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the sweep rows (JSONL) and the ranked table here; "
                   "re-running with the same --out resumes")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="try at most this many (G, W), nearest the authors' rule first "
                        "(default: until the budget)")
    p.add_argument("--no-save", action="store_true",
                   help="do not save the winner for apply(target_length=...)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/completions, /v1/chat/completions) "
                       "with prefix caching")
    common(p)
    p.add_argument("--target-length", type=int, default=None,
                   help="longest prompt + answer to read (default: 4x the trained length)")
    p.add_argument("-G", "--group-size", type=int, default=None)
    p.add_argument("-W", "--window", type=int, default=None)
    p.add_argument("--method", default=None,
                   help="another method, NAME or NAME:key=value:... (see `selfextend methods`), e.g. yarn")
    p.add_argument("--no-extend", action="store_true", help="vanilla attention")
    p.add_argument("--backend", default="auto", choices=available_backends())
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--name", default=None, help="model name clients ask for (default: the model file's name)")
    p.add_argument("--cache-mb", type=int, default=2048,
                   help="prefix cache bound in MiB (0: no prefix cache)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond it get HTTP 503")
    p.add_argument("--grace", type=float, default=30.0, help="seconds Ctrl-C waits for running requests")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
