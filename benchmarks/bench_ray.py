"""`jisu serve --replicas N` on Ray Serve against plain `jisu serve`, on this machine, loopback only.

Servers, one at a time (each started here and stopped after its passes):
  plain-2t  `jisu serve --threads 2`                          one engine, 2 threads
  plain-1t  `jisu serve --threads 1`                          one engine, 1 thread (the overhead baseline)
  ray-1x1   `jisu serve --replicas 1 --threads 1`            Ray Serve, 1 replica of 1 thread
  ray-2x1   `jisu serve --replicas 2 --threads 1`            Ray Serve, 2 replicas of 1 thread each

Each pass sends `--requests` streamed /v1/completions (temperature 0.7, EOS ignored, `--max-tokens`
each) with `--streams` in flight, and reports aggregate tok/s (generated tokens / wall time) and
TTFT p50/p99; a server's figure is the median over its passes. The Ray path's overhead is
ray-1x1 against plain-1t (tok/s). Every loop is bounded in count and in time.

A name may be given more than once: the server is started again and its passes pooled, so that
`--servers plain-1t,ray-1x1,ray-1x1,plain-1t` interleaves the two (A B B A) on a machine whose load
drifts.

    python benchmarks/bench_ray.py --out benchmarks/results/ray_serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_serve import PROMPTS, Server, free_port, pct  # noqa: E402

CONFIGS = {"plain-2t": (None, 2), "plain-1t": (None, 1), "ray-1x1": (1, 1), "ray-2x1": (2, 1)}


def server(name: str, model: str | None, kv_mb: int) -> Server:
    replicas, threads = CONFIGS[name]
    port = free_port()
    cmd = [sys.executable, "-m", "jisu.cli", "serve", *([model] if model else []), "--port", str(port),
           "--max-concurrency", "32", "--kv-memory", str(kv_mb), "--threads", str(threads)]
    if replicas:
        cmd += ["--replicas", str(replicas), "--ray-num-cpus", str(max(2, replicas * threads))]
    return Server(name, cmd, port, None, os.path.join("/tmp", f"bench_ray_{name}_{port}.log"))


async def one(client: httpx.AsyncClient, srv: Server, prompt: str, max_tokens: int, temperature: float) -> dict:
    body = {"model": srv.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    first, status, done = None, None, False
    try:
        async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and first is None and '"text"' in line:
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        status = type(e).__name__
    ok = status == 200 and done
    return {"ok": ok, "status": status, "tokens": max_tokens if ok else 0,
            "ttft": (first - t0) if first is not None else None}


async def one_pass(srv: Server, streams: int, n: int, max_tokens: int, temperature: float, limit_s: float) -> dict:
    todo = list(range(n))
    results: list[dict] = []
    deadline = time.perf_counter() + limit_s
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(limit_s + 60), limits=limits) as client:
        async def worker():
            while todo and time.perf_counter() < deadline:
                i = todo.pop()
                results.append(await one(client, srv, f"{PROMPTS[i % len(PROMPTS)]} (#{i})", max_tokens, temperature))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ok"] and r["ttft"] is not None]
    toks = sum(r["tokens"] for r in results)
    return {"requests": len(results), "ok": sum(r["ok"] for r in results), "wall_s": wall, "tokens": toks,
            "tok_s": toks / wall if wall else 0.0, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "errors": sorted({str(r["status"]) for r in results if not r["ok"]})}


def run_server(name: str, args) -> dict:
    srv = server(name, args.model, args.kv_memory)
    print(f"starting {name}: {' '.join(srv.cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    srv.start(timeout=args.start_timeout)
    started = time.perf_counter() - t0
    try:
        asyncio.run(one_pass(srv, 2, 2, 8, args.temperature, 120))          # warm-up
        passes = []
        for p in range(args.passes):
            row = asyncio.run(one_pass(srv, args.streams, args.requests, args.max_tokens, args.temperature,
                                       args.pass_timeout))
            row["loadavg"] = os.getloadavg()[0]
            passes.append(row)
            print(f"  {name} pass {p + 1}: {row['tok_s']:6.1f} tok/s  TTFT p50 {row['ttft_p50'] * 1e3:6.0f} ms  "
                  f"p99 {row['ttft_p99'] * 1e3:6.0f} ms  ({row['ok']}/{row['requests']} ok, load "
                  f"{row['loadavg']:.1f})", flush=True)
    finally:
        srv.stop()
    med = {k: statistics.median(r[k] for r in passes) for k in ("tok_s", "ttft_p50", "ttft_p99")}
    return {"server": name, "cmd": " ".join(srv.cmd[2:]), "startup_s": started, "passes": passes, **med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model (default: the default model)")
    ap.add_argument("--servers", default=",".join(CONFIGS), help=f"comma-separated, of {','.join(CONFIGS)}")
    ap.add_argument("--streams", type=int, default=16, help="requests in flight (default 16)")
    ap.add_argument("--requests", type=int, default=32, help="requests per pass (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--passes", type=int, default=2, help="passes per server; the median is reported (default 2)")
    ap.add_argument("--kv-memory", type=int, default=128, help="KV cache MB per engine (default 128)")
    ap.add_argument("--pass-timeout", type=float, default=600, help="seconds a pass may issue requests")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to start")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--note", default=None, help="a note stored with the results (e.g. the machine's load)")
    args = ap.parse_args(argv)
    names = [n for n in args.servers.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown servers: {sorted(unknown)}")
    result = {"args": vars(args), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "servers": []}
    runs = [run_server(name, args) for name in names]
    for name in dict.fromkeys(names):               # a server run more than once: its passes pooled
        mine = [r for r in runs if r["server"] == name]
        passes = [p for r in mine for p in r["passes"]]
        med = {k: statistics.median(p[k] for p in passes) for k in ("tok_s", "ttft_p50", "ttft_p99")}
        result["servers"].append({**mine[0], "startup_s": statistics.median(r["startup_s"] for r in mine),
                                  "runs": len(mine), "passes": passes, **med})
    result["order"] = names
    by = {s["server"]: s for s in result["servers"]}
    if "plain-1t" in by and "ray-1x1" in by:
        result["ray_overhead_tok_s"] = 1 - by["ray-1x1"]["tok_s"] / by["plain-1t"]["tok_s"]
    for name in ("ray-1x1", "ray-2x1"):
        if name in by and "plain-2t" in by:
            result[f"{name}_vs_plain-2t_tok_s"] = by[name]["tok_s"] / by["plain-2t"]["tok_s"]
    result["loadavg_after"] = os.getloadavg()
    print("\n| server | tok/s | TTFT p50 ms | TTFT p99 ms | start s |\n|---|---|---|---|---|")
    for s in result["servers"]:
        print(f"| {s['server']} | {s['tok_s']:.1f} | {s['ttft_p50'] * 1e3:.0f} | {s['ttft_p99'] * 1e3:.0f} | "
              f"{s['startup_s']:.0f} |")
    if "ray_overhead_tok_s" in result:
        print(f"Ray path overhead at one replica (tok/s, ray-1x1 vs plain-1t): {result['ray_overhead_tok_s']:+.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
