"""Decode speed of the LSTM student (random weights on the default model's vocabulary and embedding)
against the default model (SmolLM2-135M-Instruct) in the same weight format, in one process, the
two interleaved A B B A per round; the figure that matters is the ratio (medians).

    python benchmarks/bench_lstm.py [--layers 2 --hidden 768] [--threads 1] [--tokens 64] [--reps 3]
                                    [--pairs int8,q4_0,w4_all] [--out benchmarks/results/lstm_speed.json]

Pairs (teacher vs student, every matrix through the same jisu kernels):
  int8    the Q8_0 GGUF                     vs rtn:w8g32 (linears and embedding/tied head int8 g32)
  q4_0    the Q4_0 GGUF (Q8_0 embedding)    vs rtn:w4g32 (4-bit g32 linears, int8 g32 embedding/head)
  w4_all  the F16 GGUF compressed rtn:w4g32+embed vs the student rtn:w4g32+embed (everything 4-bit g32)
Decode tok/s is the engine's (Completion.decode_tok_s: generated tokens after the first over the
time since it), greedy, EOS ignored, speculation off, generation in its default (faithful) mode
and with --fast; the weight bytes each decoded token reads are given beside it."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jisu  # noqa: E402
import jisu.compress  # noqa: E402
from jisu.config import SamplingParams  # noqa: E402
from jisu.eval.speed import bytes_per_token, storage_nbytes, weight_format  # noqa: E402
from jisu.io.sources import load_weights, resolve  # noqa: E402
from jisu.io.student import save_student  # noqa: E402
from jisu.kernels import ops  # noqa: E402
from jisu.models.lstm import LSTMSpec, student_from_teacher  # noqa: E402

MODELS = os.path.expanduser("~/.cache/jisu/bench-models")
GGUF = os.path.join(MODELS, "SmolLM2-135M-Instruct.{}.gguf")
PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type made it possible "
          "to reproduce books quickly and cheaply, and")
PAIRS = {"int8": ("Q8_0", "rtn:w8g32"), "q4_0": ("Q4_0", "rtn:w4g32"), "w4_all": ("w4_all", "rtn:w4g32+embed")}


def build_student(spec: LSTMSpec, folder: str) -> str:
    """A random student of `spec` on the default model's embedding (from the F16 GGUF), saved as an artifact."""
    src = resolve(GGUF.format("F16"))
    cfg, w, _ = load_weights(src, packed=False)
    torch.manual_seed(0)
    model = student_from_teacher(spec, cfg, w["model.embed_tokens.weight"])
    del w
    save_student(model, folder, tokenizer_from=GGUF.format("Q8_0"), meta={"weights": "random (speed only)"})
    return folder


def compress(src: str, out: str, recipe: str) -> str:
    if not os.path.isdir(out):
        jisu.compress.compress(src, out, recipe, evaluate=False, progress=False)
    return out


def weight_bytes(llm) -> int:
    w = llm.model.w
    return bytes_per_token({n: storage_nbytes(t) for n, t in w.items()}, "model.embed_tokens.weight",
                           llm.config.vocab_size, "lm_head.weight")


def decode_tok_s(llm, ids: list[int], n: int, fast: bool) -> float:
    llm.faithful = not fast
    c = llm.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, speculative="off"))
    assert len(c.token_ids) == n
    return c.decode_tok_s


def measure_pair(name: str, teacher_path: str, student_path: str, args) -> dict:
    models = {"teacher": jisu.load(teacher_path, threads=args.threads),
              "student": jisu.load(student_path, threads=args.threads)}
    ids = models["teacher"].tokenizer.encode(PROMPT)
    assert ids == models["student"].tokenizer.encode(PROMPT)
    res = {"teacher": {"path": teacher_path}, "student": {"path": student_path}}
    for who, llm in models.items():
        res[who].update(format=weight_format(llm.model.w), weight_mb_per_token=weight_bytes(llm) / 1e6)
    for mode in ("faithful", "fast"):
        fast = mode == "fast"
        runs = {"teacher": [], "student": []}
        for who, llm in models.items():  # warm-up
            decode_tok_s(llm, ids, 8, fast)
        for r in range(args.reps):
            order = ("teacher", "student", "student", "teacher") if r % 2 == 0 else ("student", "teacher", "teacher", "student")
            for who in order:
                runs[who].append(decode_tok_s(models[who], ids, args.tokens, fast))
        med = {who: statistics.median(v) for who, v in runs.items()}
        res[mode] = {"decode_tok_s_runs": runs, "decode_tok_s_median": med,
                     "ratio_student_over_teacher": med["student"] / med["teacher"]}
        print(f"{name:7s} {mode:8s} teacher {med['teacher']:7.1f} tok/s ({res['teacher']['format']}, "
              f"{res['teacher']['weight_mb_per_token']:.1f} MB/tok)  student {med['student']:7.1f} tok/s "
              f"({res['student']['format']}, {res['student']['weight_mb_per_token']:.1f} MB/tok)  "
              f"ratio {res[mode]['ratio_student_over_teacher']:.2f}x", flush=True)
    res["bytes_ratio_teacher_over_student"] = (res["teacher"]["weight_mb_per_token"]
                                               / res["student"]["weight_mb_per_token"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--workdir", default=None, help="keep the built models here (default: a temp folder)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "lstm_speed.json"))
    args = ap.parse_args()
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in pairs if p not in PAIRS]
    if bad:
        ap.error(f"unknown pairs {bad}; choose from {list(PAIRS)}")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_lstm-")
    os.makedirs(work, exist_ok=True)
    spec = LSTMSpec(args.layers, args.hidden)
    load_before, t0 = os.getloadavg(), time.time()
    try:
        student = os.path.join(work, f"student-{args.layers}x{args.hidden}")
        if not os.path.isdir(student):
            build_student(spec, student)
        results = {}
        for name in pairs:
            teacher_kind, recipe = PAIRS[name]
            if teacher_kind == "w4_all":
                teacher = compress(GGUF.format("F16"), os.path.join(work, "teacher-w4_all"), recipe)
            else:
                teacher = GGUF.format(teacher_kind)
            stud = compress(student, os.path.join(work, f"{os.path.basename(student)}-{name}"), recipe)
            results[name] = {"recipe": recipe, **measure_pair(name, teacher, stud, args)}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = {"what": "decode tok/s of the LSTM student against the default model in the same weight format",
           "student": spec.text, "teacher": "SmolLM2-135M-Instruct",
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "threads": args.threads,
           "tokens": args.tokens, "reps": args.reps, "cpus": os.cpu_count(), "isa": ops.get_isa(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.time() - t0,
           "note": ("measured on a shared, loaded machine: only the ratios within one run (A B B A interleaved "
                    "in one process) mean anything; the absolute tok/s do not"),
           "pairs": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
