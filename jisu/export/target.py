"""`jisu compress MODEL -o OUT --target size=MB | kld=X | speed=TOK_S`: compress by candidate
recipes, measure each on this machine (artifact size, KLD on held-out text, decode tok/s), polish the
best that meets a size or speed target with end-to-end tuning (+tune, kept when it measures better),
keep the Pareto front, and put the best candidate at OUT (front: OUT.target.json/.png)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace

from ..errors import JisuError

# fixed recipes, smallest first (the kld / speed ladder; size adds mixed recipes solved for the budget)
LADDER = ("gptq:w2g32a", "gptq:w3g32", "gptq:w4g32", "gptq:w8")
# embedding / head as the source keeps them, or at 4 bits in groups of 32 or 64 (a smaller artifact for the
# same linears, or more bits for the linears at the same size)
VARIANTS = ("", "+embed=w4g32+head=w4g32", "+embed=w4g64+head=w4g64")
MIXED_BPW = (2.5, 8.0)   # the linear bits per weight a mixed recipe is asked for
W4_BPW = 4.2             # mixed ":w4" (4-bit groups or int8) from this many bits per linear weight
SIZE_TOL = 0.02          # --target size lands within 2 %
# a speed no bit width reaches: layers dropped (block influence, refit; compress/prune.py), fewest first,
# then gptq:w4g32. On the default model 20 of 30 layers gave 1.53x decode at KLD ~1.2 (results/prune_heal.json):
# pruning buys speed at a quality cost far above any bit width's, so it is only tried after the whole ladder
PRUNE_FRACTIONS = (0.125, 0.25, 0.5)
PRUNE_BASE = "gptq:w4g32"
SPEED_TOKENS = 32
# the chosen candidate is compressed once more with +tune=TUNE_STEPS (end-to-end tuning of its scales
# and norms: the same size and speed, lower KLD) and kept when that measures better; 0 turns it off.
# Default model at 73.3 MB: mixed:bpw=4.248:w4 + 4-bit g64 embedding/head 0.1178, +tune=32 0.1064,
# +tune=64 0.1022 (KLD on the built-in held-out half)
TUNE_STEPS = 64


def parse_target(text: str) -> tuple[str, float]:
    kind, _, value = str(text).partition("=")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind not in ("size", "kld", "speed") or not v > 0:
        raise JisuError(f"--target {text}: expected size=MB, kld=X or speed=TOK_S with a number > 0")
    return kind, v


def _linear_bytes(manifest: dict) -> tuple[float, int]:
    """(bytes of the artifact besides its linears, linear weight count) of a compress manifest."""
    p = manifest["params"]
    return manifest["sizes"]["total"] - p["linear_bytes"], p["linear"]


def size_candidates(model, work: str, budget_bytes: float, config, variants=VARIANTS, ladder=LADDER) -> list:
    """Recipes whose artifact lands within SIZE_TOL of the budget: per embedding/head variant a cheap
    rtn:w8 probe (not measured) fixes the bytes outside the linears, then the mixed recipe with the
    linear bits per weight that fill the budget (over 2/3/4/8-bit widths, and over 4-bit group sizes and
    int8 when the budget allows), and any fixed recipe of that size."""
    from ..compress import compress

    out = []
    for v in variants:
        probe = os.path.join(work, f"probe{len(out)}")
        m = compress(model, probe, "rtn:w8" + v, replace(config, evaluate=False, max_kld=None, force=True)).manifest
        other, n_lin = _linear_bytes(m)
        shutil.rmtree(probe)
        bpw = (budget_bytes - other) * 8 / n_lin
        if MIXED_BPW[0] <= bpw <= MIXED_BPW[1]:
            out.append(f"mixed:bpw={bpw - 0.005:.3f}{v}")  # a hair under: the allocation may round up
        if W4_BPW <= bpw <= MIXED_BPW[1]:  # 4-bit at groups 128 / 64 / 32 or int8 per linear
            out.append(f"mixed:bpw={bpw - 0.005:.3f}:w4{v}")
        for r in ladder:
            fixed = {"w2g32a": 3.0, "w3g32": 3.5, "w4g32": 4.5, "w8": 8.047}[r.split(":")[1]]
            if abs(other + fixed * n_lin / 8 - budget_bytes) <= SIZE_TOL * budget_bytes:
                out.append(r + v)
    return out


def prune_candidates(num_layers: int, fractions=PRUNE_FRACTIONS, base: str = PRUNE_BASE) -> list:
    """Depth-pruned recipes for a speed target, fewest layers dropped first."""
    counts = sorted({max(1, round(num_layers * f)) for f in fractions})
    return [f"prune:layers={n},{base}" for n in counts if n < num_layers]


def decode_speed(folder: str, threads: int | None, tokens: int = SPEED_TOKENS) -> float:
    """Greedy decode tok/s of an artifact (best of two runs of `tokens` tokens after a warm-up)."""
    from ..api import load
    from ..config import SamplingParams

    llm = load(folder, threads=threads)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, 17))
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    return max(llm.generate(prompt, params).decode_tok_s for _ in range(2))


def pareto(rows: list) -> list:
    """The rows no other row beats on both size and KLD."""
    return [r for r in rows if not any(o["bytes"] <= r["bytes"] and o["kld"] <= r["kld"] and
                                       (o["bytes"], o["kld"]) != (r["bytes"], r["kld"]) for o in rows)]


def choose(kind: str, value: float, rows: list):
    if kind == "size":
        ok = [r for r in rows if abs(r["bytes"] - value * 1e6) <= SIZE_TOL * value * 1e6]
        return min(ok, key=lambda r: r["kld"]) if ok else None
    if kind == "kld":
        ok = [r for r in rows if r["kld"] <= value]
        return min(ok, key=lambda r: r["bytes"]) if ok else None
    ok = [r for r in rows if r["tok_s"] >= value]
    return min(ok, key=lambda r: r["kld"]) if ok else None


def _tuned(recipe: str, steps: int) -> str | None:
    """recipe + "+tune=steps", or None where it already tunes or has a part tuning does not train."""
    from ..compress.recipe import parse_recipe

    if steps <= 0:
        return None
    try:
        if parse_recipe(recipe).tune:
            return None
        parse_recipe(recipe + f"+tune={steps}")
    except JisuError:
        return None
    return recipe + f"+tune={steps}"


def search(model, out: str, target: str, config, candidates: list | None = None, compare_gguf: list = (),
           measure_speed: bool | None = None, tune: int = TUNE_STEPS, pruned: list | None = None) -> dict:
    """Run the search; returns the report (also written to OUT.target.json). With tune > 0 the best
    candidate that meets the target is compressed again with +tune=tune and that row competes too.
    For a speed target that no candidate meets, the pruned recipes (default: prune_candidates of
    the model's layer count) are tried next, fewest layers dropped first."""
    from ..compress import compress
    from ..compress.run import check_output
    from ..io.sources import resolve

    kind, value = parse_target(target)
    src = resolve(model)
    out_abs = check_output(out, src.path, config.force)
    work = out_abs + f".target-{os.getpid()}"
    os.makedirs(work)
    speed = kind == "speed" if measure_speed is None else measure_speed
    t0 = time.perf_counter()
    rows = []
    try:
        if candidates is None:
            candidates = (size_candidates(model, work, value * 1e6, config) if kind == "size" else
                          list(LADDER if kind == "kld" else reversed(LADDER)))
        if not candidates:
            raise JisuError(f"--target {target}: no recipe lands within {SIZE_TOL:.0%} of {value} MB "
                            f"(mixed recipes span {MIXED_BPW[0]}-{MIXED_BPW[1]} bits per linear weight)")
        def measure(recipe: str, tok_s: float | None = None) -> dict:
            folder = os.path.join(work, f"c{len(rows)}")
            res = compress(model, folder, recipe, replace(config, max_kld=None, force=False))
            row = {"recipe": recipe, "folder": folder, "bytes": res.artifact_bytes, "kld": res.quality["kld_mean"],
                   "top1": res.quality.get("top1_agreement"), "bits_per_weight": res.bits_per_weight,
                   "compress_s": res.manifest["timings"]["total_s"]}
            if speed:
                row["tok_s"] = decode_speed(folder, config.threads) if tok_s is None else tok_s
            rows.append(row)
            return row

        for recipe in candidates:
            row = measure(recipe)
            if kind == "kld" and row["kld"] <= value:
                break  # the ladder grows: the first that meets the target is the smallest
            if kind == "speed" and row["tok_s"] >= value:
                break  # the ladder shrinks: the first fast enough has the lowest KLD
        else:
            if kind == "speed" and rows:  # no bit width is fast enough: fewer layers
                if pruned is None:
                    with open(os.path.join(rows[0]["folder"], "config.json"), encoding="utf-8") as f:
                        pruned = prune_candidates(int(json.load(f)["num_layers"]))
                for recipe in pruned:
                    if measure(recipe)["tok_s"] >= value:
                        break
        best = choose(kind, value, rows)
        polish = _tuned(best["recipe"], tune) if best is not None and kind != "kld" else None
        if polish:  # the same grids and bytes (speed too), its scales and norms trained end to end
            measure(polish, best.get("tok_s"))
            best = choose(kind, value, rows)
        if best is None:
            got = ", ".join(f"{r['recipe']}: {r['bytes'] / 1e6:.1f} MB KLD {r['kld']:.4f}"
                            + (f" {r['tok_s']:.1f} tok/s" if "tok_s" in r else "") for r in rows)
            raise JisuError(f"--target {target}: no candidate meets it ({got}); nothing written")
        if config.max_kld is not None and best["kld"] > config.max_kld:
            raise JisuError(f"--target {target}: the chosen {best['recipe']} has KLD {best['kld']:.4f}, above "
                            f"--max-kld {config.max_kld}; nothing written")
        refs = _gguf_points(src, compare_gguf, config) if compare_gguf else []
        report = {"target": {"kind": kind, "value": value}, "chosen": best["recipe"], "candidates": rows,
                  "front": [r["recipe"] for r in pareto(rows)], "llama_cpp": refs, "seconds": time.perf_counter() - t0,
                  "heldout": config.eval_text or "builtin:pydoc_topics[second half]"}
        if os.path.isdir(out_abs):
            shutil.rmtree(out_abs)
        os.replace(best["folder"], out_abs)
        for r in rows:
            r["folder"] = out_abs if r is best else None
        with open(out_abs + ".target.json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        plot(report, out_abs + ".target.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _gguf_points(src, paths, config) -> list:
    """Size and KLD (same held-out chunks, same measurement) of other GGUF quantizations of the model."""
    from ..api import load
    from ..compress.measure import ReferenceLogprobs, compare
    from ..io.sources import load_weights
    from ..io.text import heldout_ids, read_heldout

    cfg, weights, tok = load_weights(src, packed=False)
    ids, _ = heldout_ids(tok, read_heldout(config.eval_text), config.eval_chunks, min(config.eval_ctx, cfg.max_position))
    ref = ReferenceLogprobs(cfg, weights, ids)
    del weights
    out = []
    try:
        for p in paths:
            q = compare(ref, load(p, threads=config.threads).runner, ids)
            out.append({"name": os.path.basename(p), "bytes": os.path.getsize(p), "kld": q["kld_mean"]})
    finally:
        ref.close()
    return out


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows, front = report["candidates"], set(report["front"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, r["kld"], color="tab:blue" if r["recipe"] in front else "tab:gray",
                   marker="*" if r["recipe"] == report["chosen"] else "o", s=90 if r["recipe"] == report["chosen"] else 30)
        ax.annotate(r["recipe"], (r["bytes"] / 1e6, r["kld"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
    for r in report["llama_cpp"]:
        ax.scatter(r["bytes"] / 1e6, r["kld"], color="tab:red", marker="s")
        ax.annotate(r["name"], (r["bytes"] / 1e6, r["kld"]), fontsize=6, xytext=(4, -8), textcoords="offset points")
    t = report["target"]
    if t["kind"] == "size":
        ax.axvline(t["value"], color="k", lw=0.6, ls="--")
    elif t["kind"] == "kld":
        ax.axhline(t["value"], color="k", lw=0.6, ls="--")
    ax.set_xlabel("artifact / file size (MB)")
    ax.set_ylabel("KLD vs source on held-out text")
    ax.set_yscale("log")
    ax.set_title(f"--target {t['kind']}={t['value']:g}: chosen {report['chosen']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
