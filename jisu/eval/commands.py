"""Argument parsers for `jisu eval` and `jisu bench`; cli.py registers them with add_parsers()."""
from __future__ import annotations


def cmd_eval(args) -> int:
    from .runner import cmd_eval as run

    return run(args)


def cmd_bench(args) -> int:
    from .bench import cmd_bench as run

    return run(args)


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity, and KL divergence / top-1 agreement against a reference model")
    ev.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder, artifact folder or short name")
    ev.add_argument("--reference", default=None,
                    help="full-precision model to compare against (default: an artifact's manifest source)")
    ev.add_argument("--text", default=None, help="UTF-8 text file (default: the built-in pydoc corpus)")
    ev.add_argument("--chunks", type=int, default=8, help="number of chunks scored (default 8)")
    ev.add_argument("--ctx", type=int, default=256, help="tokens per chunk (default 256)")
    ev.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    ev.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ev.add_argument("--cache-dir", default=None, help="reference log-prob cache (default: ~/.cache/jisu/eval)")
    ev.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    ev.add_argument("--fp32", action="store_true",
                    help="run MODEL on the fp32 reference path too (dequantized weights, no packed/native kernels)")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="speed, latency, memory and bandwidth, optionally against peer engines")
    b.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder, artifact folder or short name")
    b.add_argument("--against", default="", help="comma-separated peers: llama.cpp,transformers")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: physical cores)")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement; medians are reported (default 3)")
    b.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="write a quality-vs-speed PNG")
    b.add_argument("--quality", default=None, metavar="FILE.json", help="a `jisu eval --json` result for the plot's KLD")
    b.add_argument("--include", action="append", metavar="FILE.json",
                   help="an earlier `jisu bench --json` result to add to the table and plot (repeatable)")
    b.add_argument("--prompt-lengths", default="32,128,256", help="prefill prompt lengths (default 32,128,256)")
    b.add_argument("--decode-tokens", default="16,128", help="LO,HI: decode tok/s = (HI-LO) / (t(HI) - t(LO)) (default 16,128)")
    b.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before decoding (default 32)")
    b.add_argument("--ppl-chunks", type=int, default=2, help="chunks for each engine's perplexity (default 2; 0 = skip)")
    b.add_argument("--ppl-ctx", type=int, default=256, help="tokens per perplexity chunk (default 256)")
    b.set_defaults(func=cmd_bench)
