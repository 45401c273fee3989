"""`jisu bench`: jisu and, with --against, each installed peer measured on the same model in the
same run (every engine in its own process); JSON, a Markdown table and a quality-vs-speed plot."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from ..errors import JisuError
from . import speed
from .peers import PEERS, unavailable

SCHEMA = "jisu.bench/1"


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version()}


def _resolve(model) -> tuple[str, str]:
    """(kind, path) of MODEL: "gguf" | "hf" from jisu's resolver, else "other" (e.g. an artifact folder
    only jisu.load understands)."""
    from ..io.sources import resolve

    try:
        src = resolve(model)
        return src.kind, src.path
    except JisuError:
        if model is not None and os.path.exists(str(model)):
            return "other", str(model)
        raise


def _run_engine(engine: str, model: str, settings: dict, ids_file: str | None, workdir: str) -> dict:
    """Measure one engine in a fresh interpreter; returns its result, or {"error": ...}."""
    out = os.path.join(workdir, f"{engine}.json")
    cmd = [sys.executable, os.path.abspath(speed.__file__), "--engine", engine, "--model", model,
           "--threads", str(settings["threads"]), "--reps", str(settings["reps"]),
           "--prompt-lengths", ",".join(map(str, settings["prompt_lengths"])),
           "--decode-tokens", ",".join(map(str, settings["decode_tokens"])),
           "--decode-prompt", str(settings["decode_prompt_tokens"]),
           "--ppl-chunks", str(settings["perplexity_chunks"]), "--ppl-ctx", str(settings["perplexity_ctx"]),
           "--out", out] + (["--ids", ids_file] if ids_file else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": f"the {engine} measurement process failed: {tail}"}


def ratios(jisu: dict, peer: dict) -> dict:
    """jisu / peer for every figure both have (throughput: > 1 means jisu is faster; time and
    bytes: < 1 means jisu is faster or smaller)."""
    def r(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    return {"prefill_tok_s": {k: r(v, peer["prefill_tok_s"].get(k)) for k, v in jisu["prefill_tok_s"].items()},
            "decode_tok_s": r(jisu["decode_tok_s"], peer["decode_tok_s"]),
            "ttft_ms": r(jisu["ttft_ms"], peer["ttft_ms"]),
            "tpot_p50_ms": r(jisu["tpot_ms"]["p50"], peer["tpot_ms"]["p50"]),
            "peak_rss_bytes": r(jisu["peak_rss_bytes"], peer["peak_rss_bytes"]),
            "weight_bytes_per_token": r(jisu["weight_bytes_per_token"], peer["weight_bytes_per_token"])}


def run_bench(model=None, *, against=(), threads: int | None = None, reps: int = 3,
              prompt_lengths=speed.PROMPT_LENGTHS, decode_tokens=speed.DECODE_TOKENS,
              decode_prompt: int = speed.DECODE_PROMPT_TOKENS, perplexity_chunks: int = 2,
              perplexity_ctx: int = 256, log=None) -> dict:
    """Measure jisu, then each peer in `against`, on MODEL; returns the bench JSON object."""
    import psutil

    log = log or (lambda msg: None)
    kind, path = _resolve(model)
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    settings = {"threads": threads, "reps": reps, "prompt_lengths": list(prompt_lengths),
                "decode_tokens": list(decode_tokens), "decode_prompt_tokens": decode_prompt,
                "perplexity_text": "builtin:pydoc_topics", "perplexity_chunks": perplexity_chunks,
                "perplexity_ctx": perplexity_ctx}
    file_bytes = speed.path_bytes(path)
    bench = {"schema": SCHEMA, "model": os.path.basename(os.path.abspath(path)), "model_path": os.path.abspath(path),
             "model_kind": kind, "file_bytes": file_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "machine": machine_info(), "settings": settings, "engines": {}, "ratios": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix="jisu-bench-") as work:
        log("measuring jisu ...")
        out = _run_engine("jisu", str(model) if model is not None else path, settings, None, work)
        if "error" in out:
            raise JisuError(f"{path}: {out['error']}")
        ids_file = os.path.join(work, "ids.json")
        with open(ids_file, "w") as f:
            json.dump(out["ids"], f)  # every peer runs the very same token ids
        engines = {"jisu": out["result"]}
        for peer in against:
            why = unavailable(peer, kind)
            if why:
                engines[peer] = {"skipped": why}
                bench["notes"].append(f"{peer} skipped: {why}")
                continue
            log(f"measuring {peer} ...")
            res = _run_engine(peer, path, settings, ids_file, work)
            engines[peer] = res.get("result", {"error": res.get("error")})
            if "error" in res:
                bench["notes"].append(f"{peer} failed: {res['error']}")
    for name, res in engines.items():
        if "decode_tok_s" in res:
            res["file_bytes"] = file_bytes
            per_token, tok_s = res.get("weight_bytes_per_token"), res.get("decode_tok_s")
            res["achieved_gb_s"] = per_token * tok_s / 1e9 if per_token and tok_s else None
    bench["engines"] = engines
    bench["ratios"] = {name: ratios(engines["jisu"], res) for name, res in engines.items()
                       if name != "jisu" and "decode_tok_s" in res}
    return bench


# ---- presentation -----------------------------------------------------------------------------

def _f(v, spec=".1f", scale=1.0):
    return "–" if v is None else format(v / scale, spec)


def to_markdown(benches: list[dict]) -> str:
    """One row per engine and model, then jisu/peer ratio rows."""
    lengths = benches[0]["settings"]["prompt_lengths"]
    head = (["engine", "model", "format", f"prefill tok/s @{'/'.join(map(str, lengths))}", "decode tok/s",
             "TTFT ms", "TPOT p50/p99 ms", "peak RSS MB", "file MB", "MB read/token", "GB/s", "ppl"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes, ratio_lines = [], []
    for b in benches:
        for name, r in b["engines"].items():
            if "decode_tok_s" not in r:
                notes.append(f"- {name} on {b['model']}: {r.get('skipped') or r.get('error')}")
                continue
            lines.append("| " + " | ".join([
                name, b["model"], r.get("weight_format", "–"),
                "/".join(_f(r["prefill_tok_s"].get(str(n))) for n in lengths), _f(r["decode_tok_s"], ".2f"),
                _f(r["ttft_ms"]), f"{_f(r['tpot_ms']['p50'])}/{_f(r['tpot_ms']['p99'])}",
                _f(r["peak_rss_bytes"], ".0f", 1e6), _f(r["file_bytes"], ".1f", 1e6),
                _f(r["weight_bytes_per_token"], ".1f", 1e6), _f(r["achieved_gb_s"], ".2f"),
                _f(r.get("perplexity"), ".3f")]) + " |")
        for peer, q in b["ratios"].items():
            ratio_lines.append("| " + " | ".join([
                f"jisu / {peer}", b["model"], "",
                "/".join(_f(q["prefill_tok_s"].get(str(n)), ".2f") for n in lengths), _f(q["decode_tok_s"], ".2f"),
                _f(q["ttft_ms"], ".2f"), _f(q["tpot_p50_ms"], ".2f"), _f(q["peak_rss_bytes"], ".2f"), "",
                _f(q["weight_bytes_per_token"], ".2f"), "", ""]) + " |")
    out = "\n".join(lines + ratio_lines)
    return out + ("\n\nnot measured:\n" + "\n".join(notes) if notes else "")


def plot_points(benches: list[dict]) -> tuple[list[dict], str, list[str]]:
    """Points for the plot: y = mean KLD where `jisu eval` results were attached (then only points
    with a KLD are drawn), else each engine's perplexity measured by the bench."""
    rows = []
    for b in benches:
        kld = ((b.get("quality") or {}).get("kld") or {}).get("mean")
        for name, r in b["engines"].items():
            if r.get("decode_tok_s") is None:
                continue
            label = f"{name} · {b['model']}" + (f" ({r['weight_format']})" if r.get("weight_format") else "")
            rows.append({"label": label, "x": r["decode_tok_s"], "kld": kld if name == "jisu" else None,
                         "ppl": r.get("perplexity")})
    key, ylabel = ("kld", "mean KL divergence vs reference (nats)") if any(p["kld"] is not None for p in rows) \
        else ("ppl", "perplexity (built-in corpus)")
    points = [{"label": p["label"], "x": p["x"], "y": p[key]} for p in rows if p[key] is not None]
    left_out = [p["label"] for p in rows if p[key] is None]
    return points, ylabel, left_out


def perplexity_points(benches: list[dict]) -> list[dict]:
    """Every engine's own perplexity (measured by the bench on the same tokens) against its decode
    speed: the panel that shows the peers, whose runs have no KL divergence."""
    pts = []
    for b in benches:
        for name, r in b["engines"].items():
            if r.get("decode_tok_s") is None or r.get("perplexity") is None:
                continue
            label = f"{name} · {b['model']}" + (f" ({r['weight_format']})" if r.get("weight_format") else "")
            pts.append({"label": label, "x": r["decode_tok_s"], "y": r["perplexity"]})
    return pts


def plot(benches: list[dict], path: str) -> str:
    """The quality-vs-speed PNG of bench results: KL divergence where measured (jisu's runs), and
    beside it, when peers were measured, every engine's perplexity."""
    from .report import plot_quality_speed

    points, ylabel, left_out = plot_points(benches)
    extra = None
    if left_out and ylabel.startswith("mean KL"):
        ppl = perplexity_points(benches)
        extra = (ppl, "perplexity on the built-in corpus (each engine's own run)")
        drawn = {p["label"] for p in ppl}
        left_out = [p for p in left_out if p not in drawn]
    title = f"{benches[0]['machine']['cpu']}, threads={benches[0]['settings']['threads']}"
    if left_out:
        title += "\nnot plotted: " + ", ".join(left_out)
    return plot_quality_speed(points, path, ylabel=ylabel, title=title, extra=extra)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise JisuError(f"{path}: no such {what} file") from None
    except (OSError, ValueError) as e:
        raise JisuError(f"{path}: not a readable JSON {what} file ({e})") from None
    if not isinstance(data, dict):
        raise JisuError(f"{path}: not a {what} file (expected a JSON object)")
    return data


def cmd_bench(args) -> int:
    against = [p.strip() for p in (args.against or "").split(",") if p.strip()]
    for p in against:
        if p not in PEERS:
            raise JisuError(f"--against: unknown peer {p!r} (known: {', '.join(PEERS)})")
    for name in ("threads", "reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise JisuError(f"--{name} must be >= 1 (got {value})")
    try:
        lengths = [int(x) for x in args.prompt_lengths.split(",")]
        decode = [int(x) for x in args.decode_tokens.split(",")]
    except ValueError:
        raise JisuError("--prompt-lengths and --decode-tokens take comma-separated integers") from None
    if len(decode) != 2 or not 0 < decode[0] < decode[1] or min(lengths) < 1:
        raise JisuError("--decode-tokens takes two counts LO,HI with 0 < LO < HI; prompt lengths must be >= 1")
    from .report import check_output_path

    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    quality = _read_json(args.quality, "jisu eval result") if args.quality else None
    if quality is not None and "perplexity" not in quality:
        raise JisuError(f"{args.quality}: not a `jisu eval --json` result (no perplexity)")
    included = [_read_json(p, "jisu bench result") for p in args.include or []]
    for p, b in zip(args.include or [], included):
        if b.get("schema") != SCHEMA:
            raise JisuError(f"{p}: not a `jisu bench --json` result (schema {b.get('schema')!r})")

    bench = run_bench(args.model, against=against, threads=args.threads, reps=args.reps, prompt_lengths=lengths,
                      decode_tokens=decode, decode_prompt=args.decode_prompt, perplexity_chunks=args.ppl_chunks,
                      perplexity_ctx=args.ppl_ctx, log=lambda m: print(f"jisu: {m}", file=sys.stderr))
    if quality is not None:
        if os.path.abspath(quality.get("model_path", "")) != bench["model_path"]:
            bench["notes"].append(f"--quality {args.quality} measured {quality.get('model_path')}, "
                                  f"not {bench['model_path']}")
        bench["quality"] = quality
    for note in bench["notes"]:
        print(f"jisu: {note}", file=sys.stderr)
    benches = [bench] + included
    print(to_markdown(benches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench, f, indent=2)
    if args.plot:
        plot(benches, args.plot)
    from .report import update_artifact_card

    jisu = bench["engines"]["jisu"]
    written = update_artifact_card(args.model, speed=jisu, size={
        "file_bytes": bench["file_bytes"], "weight_bytes_per_token": jisu.get("weight_bytes_per_token")})
    if written:
        print(f"jisu: report card written to {written}", file=sys.stderr)
    return 0
