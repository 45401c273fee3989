"""Load benchmark and soak test for `jisu serve` (and llama.cpp's llama-server, if given).

Loopback only: every server is started here on 127.0.0.1 and every request goes there. Every loop
is bounded in count and in time, and the servers are stopped at the end.

    python benchmarks/bench_serve.py                          # jisu, default model, 1/4/16/64 streams
    python benchmarks/bench_serve.py --llama-server PATH      # the same against llama-server -np 16 -c 8192 -t 2
    python benchmarks/bench_serve.py --soak-minutes 10        # random requests and cancels; leaks
    python benchmarks/bench_serve.py --llama-server PATH --interleave 3   # both up, levels alternated

With `--interleave N` both servers stay up (the idle one sleeps) and each level runs N passes
per server in the order A B B A A B ...: on a shared machine whose speed drifts within minutes,
the two servers then see the same machine, and each level reports the median of each server's
passes, the ratio of the medians and the ratio within every pass pair.

Each level runs `rounds x concurrency` streamed /v1/completions requests (fixed prompts, greedy,
EOS ignored, `--max-tokens` each) with `concurrency` in flight at once, and reports:
aggregate tok/s = generated tokens / wall time of the level; TTFT = request start -> first token
chunk; TPOT = (last chunk - first chunk) / (tokens - 1), per request; p50/p99 over requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# llama.cpp built on this machine (../shared/BENCHMARKS.md), else the peers' tree (built elsewhere, it
# may use instructions this CPU lacks)
DEFAULT_LLAMA_SERVER = next((p for p in (os.path.expanduser("~/.cache/jisu/llama.cpp-build-native/bin/llama-server"),
                                         "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")
                             if os.path.exists(p)), "llama-server")

PROMPTS = [
    "The history of the printing press begins",
    "Here is a short story about a lighthouse keeper who",
    "Explain how a refrigerator works. A refrigerator",
    "The three most important ideas in economics are",
    "Once upon a time, in a village by the sea,",
    "A good recipe for tomato soup starts with",
    "The main differences between cats and dogs are",
    "In computer science, a hash table is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ----------------------------------------------------------------------------- servers
class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str | None, log_path: str):
        self.name, self.cmd, self.port, self.model_id = name, cmd, port, model_id
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": ROOT})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    if self.model_id is None:
                        self.model_id = httpx.get(self.url + "/v1/models", timeout=5).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


def jisu_server(model: str | None, port: int, threads: int, kv_mb: int) -> Server:
    cmd = [sys.executable, "-m", "jisu.cli", "serve", *([model] if model else []), "--port", str(port),
           "--max-concurrency", "64", "--kv-memory", str(kv_mb), "--threads", str(threads)]
    return Server("jisu", cmd, port, None, os.path.join("/tmp", f"bench_serve_jisu_{port}.log"))


def llama_server(binary: str, gguf: str, port: int, threads: int) -> Server:
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "16", "-c", "8192",
           "-t", str(threads)]
    return Server("llama.cpp", cmd, port, "default", os.path.join("/tmp", f"bench_serve_llama_{port}.log"))


# ----------------------------------------------------------------------------- one request
# --temperature T: every request samples (T, top-p 0.95, a seed of its own), as clients call
SAMPLING: dict = {"temperature": 0}
_SEEDS = iter(range(1, 1 << 30))


async def one_stream(client: httpx.AsyncClient, srv: Server, prompt: str, max_tokens: int, *,
                     cancel_after: int | None = None) -> dict:
    body = {"model": srv.model_id, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            **SAMPLING}
    if SAMPLING["temperature"] > 0:
        body["seed"] = next(_SEEDS)
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    status = None
    try:
        async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        return {"status": "cancelled", "tokens": chunks}
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "tokens": chunks}
    tokens = max_tokens if chunks else 0     # EOS ignored: max_tokens tokens (chunks may merge UTF-8 pieces)
    res = {"status": status, "tokens": tokens, "chunks": chunks, "e2e": time.perf_counter() - t0}
    if first is not None:
        res["ttft"] = first - t0
        if tokens > 1:
            res["tpot"] = (last - first) / (tokens - 1)
    return res


async def one_stream_retried(client: httpx.AsyncClient, srv: Server, prompt: str, max_tokens: int) -> dict:
    """one_stream, sent once more if the connection dropped before any response (a pooled keep-alive
    connection the server had closed: seen from llama-server about once per 64 requests). The retry
    counts in the request's TTFT and in the level's wall time."""
    t0 = time.perf_counter()
    r = await one_stream(client, srv, prompt, max_tokens)
    if r["status"] in ("RemoteProtocolError", "ReadError") and r["tokens"] == 0:
        lost = time.perf_counter() - t0
        r = await one_stream(client, srv, prompt, max_tokens)
        r["retried"] = True
        if "ttft" in r:
            r["ttft"] += lost
    return r


async def run_level(srv: Server, concurrency: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    queue = list(range(n_requests))
    results: list[dict] = []
    deadline = time.perf_counter() + time_limit
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60), limits=limits) as client:
        async def worker():
            while queue and time.perf_counter() < deadline:
                i = queue.pop()
                results.append(await one_stream_retried(client, srv, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    toks = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    tpot = [r["tpot"] for r in ok if "tpot" in r]
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok), "wall_s": wall, "tokens": toks,
            "tok_s": toks / wall if wall else 0.0, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99),
            "errors": sorted({str(r["status"]) for r in results if r["status"] != 200}),
            "retried": sum(1 for r in results if r.get("retried"))}


def one_level(srv: Server, c: int, args) -> dict:
    n = max(args.min_requests, args.rounds * c)
    row = asyncio.run(run_level(srv, c, n, args.max_tokens, args.level_timeout))
    row["server"] = srv.name
    print(f"  {srv.name:9s} c={c:3d}: {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50'] * 1e3:7.0f} ms  "
          f"p99 {row['ttft_p99'] * 1e3:7.0f} ms  TPOT p50 {row['tpot_p50'] * 1e3:6.0f} ms  "
          f"p99 {row['tpot_p99'] * 1e3:6.0f} ms  ({row['ok']}/{row['requests']} ok)", flush=True)
    return row


def bench(srv: Server, args) -> list[dict]:
    asyncio.run(run_level(srv, 1, 1, 4, 120))        # warm-up
    return [one_level(srv, c, args) for c in args.concurrency]


def bench_interleaved(a: Server, b: Server, args) -> tuple[list[dict], list[dict]]:
    """Each level: args.interleave passes per server, in the order a b b a a b ... (rows tagged with
    their pass); returns (rows, per-level summary)."""
    import statistics

    for srv in (a, b):
        asyncio.run(run_level(srv, 1, 1, 4, 120))    # warm-up
    rows, summary = [], []
    for c in args.concurrency:
        got: dict = {a.name: [], b.name: []}
        for i in range(args.interleave):
            for srv in ((a, b) if i % 2 == 0 else (b, a)):
                row = one_level(srv, c, args)
                row["pass"] = i
                rows.append(row)
                got[srv.name].append(row["tok_s"])
        ma, mb = statistics.median(got[a.name]), statistics.median(got[b.name])
        pairs = [x / y for x, y in zip(got[a.name], got[b.name]) if y > 0]
        summary.append({"concurrency": c, f"{a.name}_tok_s": got[a.name], f"{b.name}_tok_s": got[b.name],
                        f"{a.name}_median": ma, f"{b.name}_median": mb, "ratio_of_medians": ma / mb if mb else None,
                        "pass_ratios": pairs})
    return rows, summary


def bench_sampling_cost(srv: Server, args) -> tuple[list[dict], list[dict]]:
    """One jisu server, each level's passes alternated greedy / sampled (temperature --temperature or
    0.7, top-p 0.95, a seed per request; speculation off in both, so the sampler alone differs):
    (rows, per-level summary as bench_interleaved's, greedy first)."""
    import statistics

    temp = args.temperature if args.temperature > 0 else 0.7
    modes = {"greedy": dict(temperature=0.0, top_p=1.0, speculative="off"),
             "sampled": dict(temperature=temp, top_p=0.95, speculative="off")}
    asyncio.run(run_level(srv, 1, 1, 4, 120))        # warm-up
    rows, summary = [], []
    for c in args.concurrency:
        got: dict = {m: [] for m in modes}
        for i in range(max(args.interleave, 1)):
            for m in (("greedy", "sampled") if i % 2 == 0 else ("sampled", "greedy")):
                SAMPLING.clear()
                SAMPLING.update(modes[m])
                srv.name = m
                row = one_level(srv, c, args)
                row["pass"] = i
                rows.append(row)
                got[m].append(row["tok_s"])
        mg, ms = statistics.median(got["greedy"]), statistics.median(got["sampled"])
        summary.append({"concurrency": c, "greedy_tok_s": got["greedy"], "sampled_tok_s": got["sampled"],
                        "greedy_median": mg, "sampled_median": ms, "ratio_of_medians": mg / ms if ms else None,
                        "pass_ratios": [x / y for x, y in zip(got["greedy"], got["sampled"]) if y > 0],
                        "sampling_cost": 1 - ms / mg if mg else None})
    srv.name = "jisu"
    return rows, summary


def summary_table(summary: list[dict], a: str, b: str) -> str:
    out = [f"| streams | {a} tok/s (passes) | {b} tok/s (passes) | {a} / {b}, medians | per pass |",
           "|---:|---|---|---:|---|"]
    for s in summary:
        fa = " / ".join(f"{x:.0f}" for x in s[f"{a}_tok_s"])
        fb = " / ".join(f"{x:.0f}" for x in s[f"{b}_tok_s"])
        pr = " ".join(f"{x:.2f}" for x in s["pass_ratios"])
        out.append(f"| {s['concurrency']} | {fa} | {fb} | {s['ratio_of_medians']:.2f} | {pr} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- soak
def metric(srv: Server, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def soak(srv: Server, minutes: float, concurrency: int, max_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    deadline = time.perf_counter() + minutes * 60
    counts: dict[str, int] = {}
    sent = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
        async def worker():
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                kind = rng.random()
                prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 12)))
                mt = rng.randint(1, 48)
                if kind < 0.5:      # stream, cancelled at a random point 40% of the time
                    cancel = rng.randint(1, mt) if rng.random() < 0.4 else None
                    r = await one_stream(client, srv, prompt, mt, cancel_after=cancel)
                    key = str(r["status"])
                elif kind < 0.8:    # chat, non-stream, sometimes given up on by the client
                    body = {"model": srv.model_id, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": mt, "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 99)}
                    timeout = 0.3 if rng.random() < 0.2 else 120
                    try:
                        resp = await client.post(srv.url + "/v1/chat/completions", json=body, timeout=timeout)
                        key = str(resp.status_code)
                    except httpx.TimeoutException:
                        key = "client-timeout"
                else:               # echo scoring, or an invalid request
                    body = {"model": srv.model_id, "prompt": prompt, "echo": True, "max_tokens": rng.choice([0, 1]),
                            "logprobs": 1}
                    if rng.random() < 0.3:
                        body["temperature"] = -1
                    resp = await client.post(srv.url + "/v1/completions", json=body)
                    key = str(resp.status_code)
                counts[key] = counts.get(key, 0) + 1

        samples = []  # (minute, server RSS MB, KV blocks in use) once a minute: RSS must stay flat

        async def sampler():
            t0 = time.perf_counter()
            while time.perf_counter() < deadline:
                samples.append((round((time.perf_counter() - t0) / 60, 2), round(srv.rss_mb(), 1),
                                await asyncio.to_thread(metric, srv, "jisu_kv_blocks_used")))
                await asyncio.sleep(min(60.0, max(0.0, deadline - time.perf_counter())))

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    return {"requests": sent, "outcomes": counts, "rss_samples": samples}


# ----------------------------------------------------------------------------- main
def table(rows: list[dict]) -> str:
    out = ["| server | streams | requests | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['server']} | {r['concurrency']} | {r['ok']}/{r['requests']} | {r['tok_s']:.1f} | "
                   f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['tpot_p50'] * 1e3:.0f} | "
                   f"{r['tpot_p99'] * 1e3:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model for jisu serve (default: the default model)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts (default 1,4,16,64)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency (default 2)")
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--level-timeout", type=float, default=300, help="seconds per level before it stops issuing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample every request at this temperature with top-p 0.95 and a seed each (default 0: greedy)")
    ap.add_argument("--kv-memory", type=int, default=256, help="jisu KV cache MB (default 256)")
    ap.add_argument("--llama-server", default=None, nargs="?", const=DEFAULT_LLAMA_SERVER,
                    help=f"llama-server binary to compare with (flag alone: {DEFAULT_LLAMA_SERVER})")
    ap.add_argument("--llama-threads", type=int, default=2,
                    help="llama-server -t (default 2; on a busy machine ggml's spinning threads can make -t 1 faster)")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="with --llama-server: keep both servers up and run N passes per server and level, "
                         "alternated (default 0: jisu's levels, then llama-server's)")
    ap.add_argument("--sampling-cost", action="store_true",
                    help="jisu alone: greedy and sampled passes alternated per level (--interleave N pairs), "
                         "the cost of sampling against greedy")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="run the soak test instead, for N minutes")
    ap.add_argument("--soak-concurrency", type=int, default=8)
    ap.add_argument("--soak-max-requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.temperature > 0:
        SAMPLING.update(temperature=args.temperature, top_p=0.95)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]

    result: dict = {"args": vars(args), "loadavg_before": os.getloadavg(), "cpus": os.cpu_count()}
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} CPUs: figures will be noisy",
              file=sys.stderr)
    srv = jisu_server(args.model, free_port(), args.threads, args.kv_memory)
    print(f"starting jisu serve on {srv.url} ...", flush=True)
    srv.start()
    try:
        if args.soak_minutes > 0:
            asyncio.run(run_level(srv, 1, 1, 4, 120))   # warm-up before the first RSS reading
            rss0 = srv.rss_mb()
            t0 = time.perf_counter()
            res = asyncio.run(soak(srv, args.soak_minutes, args.soak_concurrency, args.soak_max_requests, args.seed))
            # the server has to settle: aborted requests free their blocks at the next step
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (metric(srv, "jisu_kv_blocks_used") or metric(srv, "jisu_running_requests")):
                time.sleep(0.2)
            res.update(minutes=(time.perf_counter() - t0) / 60, rss_start_mb=rss0, rss_end_mb=srv.rss_mb(),
                       leaked_blocks=metric(srv, "jisu_kv_blocks_used"), running_after=metric(srv, "jisu_running_requests"),
                       preemptions=metric(srv, "jisu_preemptions"))
            result["soak"] = res
            print(json.dumps(res, indent=1))
        elif args.sampling_cost:
            rows, result["sampling_cost"] = bench_sampling_cost(srv, args)
            result["rows"] = rows
            print()
            print(summary_table(result["sampling_cost"], "greedy", "sampled"))
            for s in result["sampling_cost"]:
                print(f"streams {s['concurrency']}: sampling costs {100 * s['sampling_cost']:+.1f}% of greedy tok/s")
        else:
            both = bool(args.llama_server) and os.access(args.llama_server, os.X_OK)
            rows = [] if (both and args.interleave > 0) else bench(srv, args)
            if args.llama_server:
                if not os.access(args.llama_server, os.X_OK):
                    print(f"llama-server not found at {args.llama_server}: skipped", file=sys.stderr)
                else:
                    from jisu.io.sources import resolve

                    gguf = resolve(args.model).path
                    ls = llama_server(args.llama_server, gguf, free_port(), args.llama_threads)
                    if args.interleave > 0:
                        print(f"starting llama-server on {ls.url} beside jisu ...", flush=True)
                        ls.start()
                        try:
                            rows, result["interleaved"] = bench_interleaved(srv, ls, args)
                        finally:
                            ls.stop()
                    else:
                        rc = srv.stop()                     # one server at a time on the cores
                        print(f"jisu exited {rc}; starting llama-server on {ls.url} ...", flush=True)
                        ls.start()
                        try:
                            rows += bench(ls, args)
                        finally:
                            ls.stop()
            result["rows"] = rows
            print()
            print(table(rows))
            if result.get("interleaved"):
                print()
                print(summary_table(result["interleaved"], "jisu", "llama.cpp"))
    finally:
        result["jisu_exit"] = srv.stop()
        result["loadavg_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
