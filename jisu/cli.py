"""The `jisu` command: a thin argparse front over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import JisuError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=None, help="temperature; 0 = greedy (default 0.7; 0 with --beams)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below P x the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--beams", type=int, default=1, metavar="N", help="beam search with N beams (default 1: off)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="L",
                   help="beam search: a finished beam scores its log-probability / length ** L (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--isa", default=None, choices=["best", "avx512", "avx2", "neon", "scalar"],
                   help="the kernels' instruction set (default: the best this CPU runs)")
    p.add_argument("--precise", action="store_true",
                   help="~15-bit activations in the quantized kernels: the fp32 path's output on the same "
                        "weights (greedy tokens included), at about half the prefill speed")
    p.add_argument("--fast", action="store_true",
                   help="plain int8 activations (as llama.cpp): fastest, but near-ties can flip greedy tokens "
                        "away from the fp32 reference's (default: faithful, see README)")


def _params(args):
    from .config import SamplingParams

    beams = getattr(args, "beams", 1)
    temp = args.temp if args.temp is not None else (0.0 if beams > 1 else 0.7)
    return SamplingParams(max_tokens=args.max_tokens, temperature=temp, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, num_beams=beams,
                          length_penalty=getattr(args, "length_penalty", 1.0),
                          json_schema=_read_text(getattr(args, "json_schema", None), "--json-schema", as_json=True),
                          grammar=_read_text(getattr(args, "grammar", None), "--grammar"))


def _speculative_arg(value: str) -> str:
    if value in ("auto", "ngram", "off") or (value.startswith("draft:") and len(value) > 6):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use auto, ngram, off or draft:MODEL")


def _speculative(args, llm) -> str:
    """The requests' speculative mode; `draft:MODEL` loads the draft model onto `llm` (its vocabulary
    checked against the target's)."""
    spec = getattr(args, "speculative", "auto")
    if spec.startswith("draft:"):
        from .api import load
        from .engine.speculative import DraftModelProposer

        draft = load(spec[len("draft:"):], fast=not llm.faithful)
        path = lambda m: os.path.realpath(m.source.path) if getattr(m, "source", None) else None  # noqa: E731
        same = path(draft) is not None and path(draft) == path(llm)
        llm.draft = DraftModelProposer.from_llm(draft, llm.tokenizer, llm.config, same_as_target=same)
        return "draft"
    return spec


def _read_text(path: str | None, option: str, as_json: bool = False):
    """The contents of an option's file (parsed as JSON with `as_json`); None without the option."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise JisuError(f"{option}: cannot read {path} ({e})") from None
    if not as_json:
        return text
    try:
        return json.loads(text)
    except ValueError as e:
        raise JisuError(f"{option}: {path} is not valid JSON ({e})") from None


def _load(args):
    from .api import load

    if args.threads is not None and args.threads < 1:
        raise JisuError(f"--threads must be >= 1 (got {args.threads})")
    return load(args.model, threads=args.threads, progress=sys.stderr.isatty(),
                precise=True if getattr(args, "precise", False) else None, fast=getattr(args, "fast", False),
                isa=getattr(args, "isa", None))


def cmd_run(args) -> int:
    from .api import StreamState

    from dataclasses import replace

    params = _params(args)  # validate options before the (slow) load
    llm = _load(args)
    params = replace(params, speculative=_speculative(args, llm))
    if args.raw or not llm.tokenizer.chat_template:
        if not args.raw:
            print("jisu: the model has no chat template; sending the prompt as raw text", file=sys.stderr)
        prompt = args.prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = messages + [{"role": "user", "content": args.prompt}]
    state = StreamState()
    for piece in llm.stream(prompt, params, state=state):
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    c = state.completion
    if args.json:
        spec = {k[5:]: v for k, v in llm.engine_stats().items() if k.startswith("spec_")}
        print(json.dumps({"model": llm.source.name, **c.to_dict(), "speculative": {"mode": args.speculative, **spec}},
                         ensure_ascii=False))
    else:
        print()
        print(f"[prompt {len(c.prompt_token_ids)} tok, {c.prefill_tok_s:.1f} tok/s | generated "
              f"{len(c.token_ids)} tok, {c.decode_tok_s:.1f} tok/s | {c.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .api import StreamState

    params = _params(args)
    llm = _load(args)
    if not llm.tokenizer.chat_template:
        raise JisuError(f"{llm.source.path}: the model has no chat template; use `jisu run --raw`")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"jisu chat with {llm.source.name} — /reset clears the conversation, /exit or Ctrl-D quits",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        state = StreamState()
        for piece in llm.stream(messages, params, state=state):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": state.completion.text})
    return 0


def cmd_models(args) -> int:
    from .io.sources import ALIASES, KNOWN_MODELS, known_model_path

    print("Known models (MODEL may also be a .gguf file or an HF model folder):")
    for name, known in KNOWN_MODELS.items():
        path = known_model_path(known)
        aliases = ", ".join(a for a, target in ALIASES.items() if target == name)
        default = " (default)" if name == "smollm2" else ""
        print(f"  {name}{default} — {known.title}; also: {aliases}")
        if path:
            print(f"      installed: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
        else:
            print(f"      not installed: {known.install}")
    return 0


def cmd_compress(args) -> int:
    from .compress import compress

    if args.target or not args.recipe:
        return _compress_target(args)
    result = compress(args.model, args.output, args.recipe, calib=args.calib, samples=args.samples,
                      seq_len=args.seq_len, max_kld=args.max_kld, force=args.force, eval_text=args.eval_text,
                      threads=args.threads, progress=sys.stderr.isatty())
    grew = result.growth()
    if grew:
        print(grew, file=sys.stderr)
    if args.json:
        m = result.manifest
        print(json.dumps({"path": result.path, "recipe": m["recipe"], "bits_per_weight": m["bits_per_weight"],
                          "sizes": m["sizes"], "quality": m["quality"], "timings": m["timings"],
                          "peak_rss_bytes": m["peak_rss_bytes"]}))
    else:
        print(result.summary())
    return 0


def _compress_target(args) -> int:
    from .compress import CompressConfig
    from .export.target import TUNE_STEPS, search

    if not args.target or args.recipe:
        raise JisuError("give --recipe or --target (size=MB, kld=X or speed=TOK_S), one of them")
    config = CompressConfig(calib=args.calib, samples=args.samples, seq_len=args.seq_len, max_kld=args.max_kld,
                            force=args.force, eval_text=args.eval_text, threads=args.threads,
                            progress=sys.stderr.isatty())
    report = search(args.model, args.output, args.target, config,
                    compare_gguf=[p for p in (args.compare or "").split(",") if p],
                    tune=TUNE_STEPS if args.target_tune is None else args.target_tune)
    best = next(r for r in report["candidates"] if r["recipe"] == report["chosen"])
    print(json.dumps(report) if args.json else
          f"{args.output}: {best['recipe']} ({best['bytes'] / 1e6:.1f} MB, KLD {best['kld']:.4f}) chosen for "
          f"--target {args.target} among {len(report['candidates'])} measured; front: {', '.join(report['front'])}; "
          f"{args.output}.target.json / .png")
    return 0


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="quantize a model into an artifact folder (jisu run/load it)")
    c.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder, artifact or short name (default: smollm2)")
    c.add_argument("-o", "--output", required=True, help="artifact folder to write (must not exist unless --force)")
    c.add_argument("--target", default=None, help="instead of --recipe: size=MB, kld=X or speed=TOK_S; measures "
                                                  "candidate recipes and keeps the best that meets it")
    c.add_argument("--target-tune", type=int, default=None, metavar="STEPS",
                   help="with --target size= or speed=: +tune steps for the chosen candidate, kept when its KLD "
                        "is lower (default 64; 0: no polish)")
    c.add_argument("--compare", default=None, help="with --target: GGUF files (comma-separated) of the same model "
                                                   "drawn on the front")
    c.add_argument("--recipe", default=None,
                   help="e.g. rtn:w8, rtn:w4g32, rtn:w4g32a, gptq:w4g32, gptq:w3g32, awq:w4g64, nf4:g64, kmeans:g64, "
                        "mixed:bpw=3.5; options +embed, +head, +tune (README: Compression recipes)")
    c.add_argument("--calib", default=None, help="calibration text (.txt, or .jsonl with a \"text\" field); "
                                                 "default: first half of the built-in pydoc corpus")
    c.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    c.add_argument("--max-kld", type=float, default=None, help="fail (writing nothing) if the measured KLD is above X")
    c.add_argument("--eval-text", default=None, help="held-out text for the quality figures "
                                                     "(default: second half of the built-in corpus)")
    c.add_argument("--force", action="store_true", help="replace an existing OUTPUT (only once the new one is verified)")
    c.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    c.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    c.set_defaults(func=cmd_compress)


def cmd_distill(args) -> int:
    from .compress.distill_student import distill_student

    r = distill_student(args.teacher, args.output, args.student, minutes=args.minutes, tokens=args.tokens,
                        text=args.text, samples=args.samples, seq_len=args.seq_len, no_teacher=args.no_teacher,
                        force=args.force, threads=args.threads, progress=sys.stderr.isatty(), gen=args.gen,
                        **({} if args.lr is None else {"lr": args.lr}))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['path']}: {r['student']} {r['mode']}, {r['tokens']} tokens in {r['cpu_minutes']:.1f} CPU-minutes "
              f"({r['wall_minutes']:.1f} wall); held-out perplexity {r['heldout_perplexity']:.2f}")
    return 0


def _distill_parser(sub) -> None:
    d = sub.add_parser("distill", help="train a small student model (LSTM) from a teacher's next-token distributions")
    d.add_argument("teacher", nargs="?", default=None, help="GGUF file, HF folder, artifact or short name (default: smollm2)")
    d.add_argument("-o", "--output", required=True, help="artifact folder to write (must not exist unless --force)")
    d.add_argument("--student", required=True, help="lstm:layers=N,hidden=H[,tied=0|1], or an LSTM artifact to train further")
    d.add_argument("--minutes", type=float, default=None, help="budget in CPU-minutes (process CPU time / threads)")
    d.add_argument("--tokens", type=int, default=None, help="budget in training tokens")
    d.add_argument("--text", default=None, help="training text (.txt / .jsonl; default: first half of the built-in corpus)")
    d.add_argument("--samples", type=int, default=64, help="windows cut from the text (default 64; the last eighth held out)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    d.add_argument("--no-teacher", action="store_true", help="plain cross-entropy training on the same tokens (the baseline)")
    d.add_argument("--gen", type=int, default=0, help="add N windows of text the teacher writes itself (sampled, cached)")
    d.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    d.add_argument("--force", action="store_true", help="replace an existing OUTPUT artifact")
    d.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    d.add_argument("--json", action="store_true", help="print one JSON object with the figures and the curve")
    d.set_defaults(func=cmd_distill)


def cmd_export(args) -> int:
    from .export import ExportOptions, OnnxOptions, export_gguf, export_onnx

    kind, run = (OnnxOptions, export_onnx) if args.format == "onnx" else (ExportOptions, export_gguf)
    options = kind(qtype=args.type, recipe=args.recipe, calib=args.calib, samples=args.samples,
                   seq_len=args.seq_len, eval_text=args.eval_text, max_kld=args.max_kld,
                   force=args.force, check=not args.no_check, threads=args.threads,
                   progress=sys.stderr.isatty())
    result = run(args.model, args.output, options)
    print(json.dumps(result.card) if args.json else result.summary())
    return 0


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a GGUF on llama.cpp's exact grids or an ONNX decoder, checked in "
                                      "llama.cpp / onnxruntime")
    e.add_argument("model", nargs="?", default=None, help="artifact, GGUF file or short name (default: smollm2)")
    e.add_argument("--format", choices=("gguf", "onnx"), default="gguf", help="gguf (default) or onnx (a folder)")
    e.add_argument("-o", "--output", required=True, help="OUT.gguf / ONNX folder (must not exist unless --force)")
    e.add_argument("--type", default=None, help="gguf: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K or Q4_K_M "
                                               "(default: an artifact's own grid, else Q4_K_M); "
                                               "onnx: fp32, fp16, int8 or int4 (default int4)")
    e.add_argument("--recipe", default=None, help="rtn (default) or gptq: GPTQ onto llama.cpp's grids, calibrated")
    e.add_argument("--calib", default=None, help="calibration text for gptq (default: first half of the built-in corpus)")
    e.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    e.add_argument("--eval-text", default=None, help="held-out text of the check (default: second half of the built-in corpus)")
    e.add_argument("--max-kld", type=float, default=None, help="refuse the export (writing nothing) if its KLD is above X")
    e.add_argument("--no-check", action="store_true", help="do not run the export in its runtime")
    e.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    e.add_argument("--json", action="store_true", help="print the report card as JSON")
    e.set_defaults(func=cmd_export)


def cmd_serve(args) -> int:
    from .serve import serve

    if args.max_concurrency < 1 or args.max_queue < 0:
        raise JisuError("--max-concurrency must be >= 1 and --max-queue >= 0")
    if args.kv_memory is not None and args.kv_memory <= 0:
        raise JisuError(f"--kv-memory must be a positive number of MB (got {args.kv_memory})")
    if not 0 <= args.port <= 65535:
        raise JisuError(f"--port must be in [0, 65535] (got {args.port})")
    api_key = args.api_key or os.environ.get("JISU_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"jisu: warning: serving on {args.host} without an API key", file=sys.stderr)
    app_kw = dict(api_key=api_key, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                  kv_memory_mb=args.kv_memory, served_model_name=args.served_model_name, kv_dtype=args.kv_dtype)
    if _on_ray(args):
        return _serve_on_ray(args, app_kw)
    llm = _load(args)
    spec = _speculative(args, llm)
    print(f"jisu: serving {llm.source.name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    return serve(llm, args.host, args.port, **app_kw, speculative=spec, draft=getattr(llm, "draft", None))


def _on_ray(args) -> bool:
    return any(v is not None for v in (args.replicas, args.ray_address, args.min_replicas, args.max_replicas))


def _serve_on_ray(args, app_kw: dict) -> int:
    """`jisu serve --replicas N`: N engine replicas (each loading the model) on Ray Serve."""
    from .serve.ray_serve import RayServeConfig, require_ray, serve_on_ray

    require_ray()
    model = args.model                                # a short name (or None) is resolved on each replica
    if model is not None and os.path.exists(model):
        model = os.path.abspath(model)
    cfg = RayServeConfig(model=model, replicas=args.replicas or 1, threads=args.threads or 1,
                         min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         target_ongoing_requests=args.target_ongoing_requests,
                         load_kw={"precise": True if args.precise else None, "fast": args.fast}, app_kw=app_kw)
    return serve_on_ray(cfg, args.host, args.port, address=args.ray_address, num_cpus=args.ray_num_cpus)


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder, artifact or short name (default: smollm2)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set JISU_API_KEY)")
    s.add_argument("--max-concurrency", type=int, default=64, help="sequences decoded together (default 64)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those; more get 429 (default 256)")
    s.add_argument("--kv-memory", type=float, default=None, metavar="MB", help="KV cache size in MB (default 256)")
    s.add_argument("--kv-dtype", choices=("auto", "f16", "f32"), default="auto",
                   help="KV cache storage (default auto: f16 for quantized models on the native CPU step; "
                        "f32 for fp32 models, with --precise and on the reference path)")
    s.add_argument("--served-model-name", default=None, help="model id reported by /v1/models")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    s.add_argument("--precise", action="store_true", help="~15-bit activations in the quantized kernels (see jisu run)")
    s.add_argument("--fast", action="store_true", help="plain int8 activations, not faithful (see jisu run)")
    s.add_argument("--speculative", type=_speculative_arg, default="auto", metavar="MODE", help=SPEC_HELP)
    r = s.add_argument_group("Ray Serve (pip install 'jisu[ray]'; README: Scaling out on Ray)")
    r.add_argument("--replicas", type=int, default=None,
                   help="serve with N engine replicas on Ray Serve, each with --threads threads (default 1) "
                        "and its own KV cache; requests sharing a prompt prefix go to the same replica")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. HEAD:6379); default: a local Ray")
    r.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least N replicas")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most N replicas")
    r.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscale: requests in flight per replica to aim for (default 16)")
    s.set_defaults(func=cmd_serve)


SPEC_HELP = ("speculative decoding: auto (default: n-gram prompt lookup, off while it does not pay), ngram, "
             "draft:MODEL (a smaller model or compressed copy with the same tokenizer drafts), off")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="jisu", description="Compress, run, measure and serve language models.")
    parser.add_argument("--version", action="version", version=f"jisu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text from a prompt")
    run.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder or short name (default: smollm2)")
    run.add_argument("-p", "--prompt", required=True, help="the user message (or raw text with --raw)")
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("--system", default=None, help="system message for chat models")
    run.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    run.add_argument("--speculative", type=_speculative_arg, default="auto", metavar="MODE", help=SPEC_HELP)
    run.add_argument("--json-schema", metavar="FILE", default=None,
                     help="constrain the output to JSON valid under the JSON Schema in FILE")
    run.add_argument("--grammar", metavar="FILE", default=None,
                     help="constrain the output to the Lark grammar in FILE (llguidance's dialect)")
    _sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    chat.add_argument("model", nargs="?", default=None)
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="list known models and whether they are installed")
    models.set_defaults(func=cmd_models)
    _compress_parser(sub)  # `jisu compress`
    _serve_parser(sub)  # `jisu serve`
    _export_parser(sub)  # `jisu export`
    _distill_parser(sub)  # `jisu distill`

    from .eval.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub)  # `jisu eval`, `jisu bench`
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JisuError as e:
        print(f"jisu: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
