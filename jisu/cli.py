"""The `jisu` command: a thin argparse front over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import JisuError


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.7, help="temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below P x the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _params(args):
    from .config import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def _load(args):
    from .api import load

    if args.threads is not None and args.threads < 1:
        raise JisuError(f"--threads must be >= 1 (got {args.threads})")
    return load(args.model, threads=args.threads, progress=sys.stderr.isatty())


def cmd_run(args) -> int:
    from .api import StreamState

    params = _params(args)  # validate options before the (slow) load
    llm = _load(args)
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
        print(json.dumps({"model": llm.source.name, **c.to_dict()}, ensure_ascii=False))
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
    _sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    chat.add_argument("model", nargs="?", default=None)
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="list known models and whether they are installed")
    models.set_defaults(func=cmd_models)
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
