"""Speculative decoding on the default model (Q4_0 file, 2 threads): n-gram on a code-editing and a
summarizing task against plain decode and llama-bench's plain decode, auto on ungrounded chat at 1
and 16 streams, and a Q8_0 / F16 target drafted by the 4-bit file; modes interleaved, ratios of medians.

    python benchmarks/bench_speculative.py [--threads 2] [--reps 3] [--quick] [--out results/speculative.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = os.path.expanduser("~/.cache/jisu/bench-models")
LLAMA_BENCH = os.path.expanduser("~/.cache/jisu/llama.cpp-build-native/bin/llama-bench")
HERE = os.path.dirname(os.path.abspath(__file__))

CODE = '''def parse_records(lines, delimiter=",", skip_header=True):
    """Parse delimited text lines into a list of dictionaries."""
    records = []
    header = None
    for number, line in enumerate(lines):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(delimiter)]
        if header is None:
            if skip_header:
                header = fields
                continue
            header = [f"column_{i}" for i in range(len(fields))]
        if len(fields) != len(header):
            raise ValueError(f"line {number}: expected {len(header)} fields, got {len(fields)}")
        record = {}
        for name, value in zip(header, fields):
            if value.isdigit():
                record[name] = int(value)
            else:
                try:
                    record[name] = float(value)
                except ValueError:
                    record[name] = value
        records.append(record)
    return records
'''

TEXT = ("The city council met on Tuesday evening to discuss the proposed expansion of the public library. "
        "The plan, which has been under review for nearly two years, would add a new wing with study rooms, "
        "a children's reading area and a small auditorium for community events. Supporters argued that the "
        "current building is overcrowded, especially after school hours, and that the auditorium would give "
        "local groups a free place to meet. Opponents raised concerns about the cost, estimated at 4.2 million "
        "dollars, and about the loss of twenty parking spaces behind the building. The library director said "
        "that visits have grown by thirty percent since 2019 and that the waiting list for study rooms is often "
        "longer than a week. After three hours of public comment, the council voted five to two to approve the "
        "first phase of the project, which covers the design work and a traffic study. Construction could begin "
        "next spring if the second phase, including the final budget, is approved in the autumn.")


def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def copy_rate(prompt: list[int], out: list[int], n: int = 4) -> float:
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    outs = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
    return sum(g in grams for g in outs) / len(outs) if outs else 0.0


def one_stream(engine, ids, params) -> dict:
    """Decode tok/s of one request (first output = prefill; time from it to the last)."""
    before = engine.stats()
    toks, t_first, t_last, steps = [], None, None, 0
    for out in engine.stream(ids, params):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        else:
            steps += 1
        t_last = now
        toks += out.token_ids
    after = engine.stats()
    n = len(toks) - 1
    d = {k: after[k] - before[k] for k in ("spec_drafted_tokens", "spec_accepted_tokens", "spec_verify_steps")}
    return {"tokens": toks, "decode_tok_s": n / (t_last - t_first) if t_last > t_first else 0.0,
            "tokens_per_step": n / steps if steps else 0.0, **d}


def many_streams(engine, prompts, params) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(o["token_ids"]) for o in out)
    return {"tokens": [o["token_ids"] for o in out], "tok_s": n / dt}


def engine(llm, mode, draft=None, seqs=1):
    from jisu.engine.engine import Engine

    return Engine.from_llm(llm, speculative=mode, draft=draft, max_num_seqs=seqs, kv_memory_mb=128,
                           prefix_caching=False)


def interleaved(runs: dict, reps: int, measure) -> dict:
    """runs: name -> engine; each rep measures every engine, the order reversed on odd reps."""
    res = {k: [] for k in runs}
    names = list(runs)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            res[k].append(measure(runs[k]))
    return res


def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def llama_bench(path: str, threads: int, n: int) -> float | None:
    if not os.path.exists(LLAMA_BENCH):
        return None
    res = subprocess.run([LLAMA_BENCH, "-m", path, "-t", str(threads), "-p", "0", "-n", str(n), "-r", "3", "-o", "json"],
                         capture_output=True, text=True)
    if res.returncode:
        return None
    return float(json.loads(res.stdout)[0]["avg_ts"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="few tokens and one rep: checks the script")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "speculative.json"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.tokens = 1, 48
    import jisu
    from jisu.config import SamplingParams
    from jisu.engine.speculative import DraftModelProposer

    q4 = os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_0.gguf")
    llm = jisu.load(q4, threads=args.threads)
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=False)
    report = {"model": q4, "threads": args.threads, "reps": args.reps, "max_tokens": args.tokens}

    tasks = {"code_edit": chat_ids(llm, "Rewrite this function so that the parameter `delimiter` is called `sep`. "
                                        "Output the whole function.\n\n```python\n" + CODE + "```"),
             "summarize": chat_ids(llm, TEXT + "\n\nSummarize the text above in a few sentences.")}
    engines = {m: engine(llm, m) for m in ("off", "ngram", "auto")}
    for name, ids in tasks.items():
        rs = interleaved(engines, args.reps, lambda e: one_stream(e, ids, greedy))
        same = all(r["tokens"] == rs["off"][0]["tokens"] for k in rs for r in rs[k])
        row = {"prompt_tokens": len(ids), "identical_output": same,
               "copy_rate": copy_rate(ids, rs["off"][0]["tokens"]), "generated": len(rs["off"][0]["tokens"])}
        for k, v in rs.items():
            row[k] = {"decode_tok_s": med(v, "decode_tok_s"), "tokens_per_step": med(v, "tokens_per_step"),
                      "drafted": v[0]["spec_drafted_tokens"], "accepted": v[0]["spec_accepted_tokens"]}
        for k in ("ngram", "auto"):
            row[f"{k}_vs_off"] = row[k]["decode_tok_s"] / row["off"]["decode_tok_s"]
        report[name] = row
        print(name, json.dumps(row), flush=True)

    lb = llama_bench(q4, args.threads, 128)
    report["llama_bench_decode_tok_s"] = lb
    if lb:
        report["code_edit"]["ngram_vs_llama_bench"] = report["code_edit"]["ngram"]["decode_tok_s"] / lb
        report["summarize"]["ngram_vs_llama_bench"] = report["summarize"]["ngram"]["decode_tok_s"] / lb
    print("llama-bench decode", lb, flush=True)

    chat = json.load(open(os.path.join(HERE, "prompts_chat50.json")))
    chat_n = 4 if args.quick else 8
    chat_params = SamplingParams(temperature=0, max_tokens=min(args.tokens, 128))
    one = {m: engines[m] for m in ("off", "auto")}
    def chat_run(e):
        rs = [one_stream(e, chat_ids(llm, q), chat_params) for q in chat[:chat_n]]
        return {"decode_tok_s": statistics.mean(r["decode_tok_s"] for r in rs),
                "drafted": sum(r["spec_drafted_tokens"] for r in rs), "accepted": sum(r["spec_accepted_tokens"] for r in rs)}

    rs = interleaved(one, args.reps, chat_run)
    report["chat_1_stream"] = {k: med(v, "decode_tok_s") for k, v in rs.items()}
    report["chat_1_stream"]["auto_drafted_accepted"] = [rs["auto"][0]["drafted"], rs["auto"][0]["accepted"]]
    report["chat_1_stream"]["auto_vs_off"] = report["chat_1_stream"]["auto"] / report["chat_1_stream"]["off"]
    report["chat_1_stream"]["auto_vs_off_runs"] = [a["decode_tok_s"] / o["decode_tok_s"]
                                                   for a, o in zip(rs["auto"], rs["off"])]
    sixteen = {m: engine(llm, m, seqs=16) for m in ("off", "auto")}
    prompts16 = [chat_ids(llm, q) for q in chat[:16]]
    rs = interleaved(sixteen, args.reps, lambda e: many_streams(e, prompts16, chat_params))
    report["chat_16_streams"] = {k: med(v, "tok_s") for k, v in rs.items()}
    report["chat_16_streams"]["auto_vs_off"] = report["chat_16_streams"]["auto"] / report["chat_16_streams"]["off"]
    report["chat_16_streams"]["auto_vs_off_runs"] = [a["tok_s"] / o["tok_s"] for a, o in zip(rs["auto"], rs["off"])]
    report["chat_16_streams"]["identical_output"] = rs["auto"][0]["tokens"] == rs["off"][0]["tokens"]
    print("chat", json.dumps(report["chat_1_stream"]), json.dumps(report["chat_16_streams"]), flush=True)
    del engines, one, sixteen

    for target_name in ("Q8_0", "F16"):
        path = os.path.join(MODELS, f"SmolLM2-135M-Instruct.{target_name}.gguf")
        if not os.path.exists(path):
            continue
        tgt = jisu.load(path, threads=args.threads)
        draft = DraftModelProposer.from_llm(llm, tgt.tokenizer, tgt.config, kv_memory_mb=64)
        es = {"off": engine(tgt, "off"), "draft": engine(tgt, "draft", draft=draft)}
        row = {}
        for name, ids in [("code_edit", tasks["code_edit"]), ("chat", chat_ids(llm, chat[4]))]:
            rs = interleaved(es, args.reps, lambda e: one_stream(e, ids, greedy))
            row[name] = {"off": med(rs["off"], "decode_tok_s"), "draft": med(rs["draft"], "decode_tok_s"),
                         "tokens_per_step": med(rs["draft"], "tokens_per_step"),
                         "acceptance": rs["draft"][0]["spec_accepted_tokens"] / max(1, rs["draft"][0]["spec_drafted_tokens"]),
                         "identical_output": all(r["tokens"] == rs["off"][0]["tokens"] for r in rs["draft"])}
            row[name]["draft_vs_off"] = row[name]["draft"] / row[name]["off"]
        report[f"target_{target_name}_draft_Q4_0"] = row
        print(target_name, json.dumps(row), flush=True)
        del es, tgt

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
