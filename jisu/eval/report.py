"""The report card: quality (`jisu eval`), speed (`jisu bench`) and size of one model, as JSON or
Markdown, stored in a compressed artifact's manifest.json; and the quality-vs-speed plot."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from ..errors import JisuError

MANIFEST = "manifest.json"


@dataclass
class ReportCard:
    """quality: QualityResult.to_dict(); speed: one engine's `jisu bench` result; size: file_bytes,
    weight_bytes_per_token. Sections are None until measured. Keys: docs/report_card.md."""
    model: str
    quality: dict | None = None
    speed: dict | None = None
    size: dict | None = None
    updated: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ReportCard":
        return cls(**{k: d.get(k) for k in ("model", "quality", "speed", "size") if k in d},
                   **({"updated": d["updated"]} if "updated" in d else {}))

    def to_markdown(self) -> str:
        rows: list[tuple[str, str]] = []
        q, s, z = self.quality or {}, self.speed or {}, self.size or {}
        if q:
            rows.append(("perplexity", f"{q['perplexity']:.4f} ({q.get('tokens_scored')} tokens of {q.get('text')})"))
            if q.get("kld"):
                rows += [("reference", str(q.get("reference"))),
                         ("delta perplexity", f"{q['delta_perplexity']:+.4f}"),
                         ("KLD mean / median / p99 / max",
                          " / ".join(f"{q['kld'][k]:.4g}" for k in ("mean", "median", "p99", "max"))),
                         ("top-1 agreement", f"{100 * q['top1_agreement']:.2f} %")]
        if s:
            rows += [("prefill tok/s", ", ".join(f"{v:.1f} @{k}" for k, v in s["prefill_tok_s"].items())),
                     ("decode tok/s", _fmt(s.get("decode_tok_s"), ".2f")),
                     ("time to first token", f"{_fmt(s.get('ttft_ms'), '.1f')} ms"),
                     ("time per output token p50 / p99",
                      f"{_fmt(s['tpot_ms']['p50'], '.1f')} / {_fmt(s['tpot_ms']['p99'], '.1f')} ms"),
                     ("peak RSS", f"{_fmt(_mb(s.get('peak_rss_bytes')), '.0f')} MB"),
                     ("achieved weight bandwidth", f"{_fmt(s.get('achieved_gb_s'), '.2f')} GB/s")]
        if z:
            rows += [("file size", f"{_fmt(_mb(z.get('file_bytes')), '.1f')} MB"),
                     ("weight bytes per token", f"{_fmt(_mb(z.get('weight_bytes_per_token')), '.1f')} MB")]
        lines = [f"### Report card: {self.model}", "", "| metric | value |", "|---|---|"]
        return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def _mb(n):
    return None if n is None else n / 1e6


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def check_output_path(path: str | None, flag: str) -> None:
    """Fail before any work when an output file could not be written at the end."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise JisuError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise JisuError(f"{flag} {path}: cannot write there")


def artifact_manifest(model) -> str | None:
    """MODEL/manifest.json when MODEL is an artifact folder, else None."""
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        path = os.path.join(model, MANIFEST)
        if os.path.isfile(path):
            return path
    return None


def write_report_card(artifact_dir: str, card: ReportCard) -> str:
    """Store `card` under "report_card" in ARTIFACT/manifest.json (other keys untouched; atomic replace)."""
    path = os.path.join(artifact_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise JisuError(f"{artifact_dir}: no {MANIFEST} (not a jisu artifact folder)") from None
    except ValueError as e:
        raise JisuError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise JisuError(f"{path}: expected a JSON object")
    manifest["report_card"] = card.to_dict()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_report_card(artifact_dir: str) -> ReportCard | None:
    with open(os.path.join(artifact_dir, MANIFEST)) as f:
        card = json.load(f).get("report_card")
    return ReportCard.from_dict(card) if card else None


def update_artifact_card(model, *, quality: dict | None = None, speed: dict | None = None,
                         size: dict | None = None) -> str | None:
    """When MODEL is an artifact folder, merge the given sections into its report card; returns the
    manifest path written, or None when MODEL is not an artifact."""
    if artifact_manifest(model) is None:
        return None
    card = read_report_card(model) or ReportCard(model=os.path.basename(os.path.abspath(model)))
    for name, value in (("quality", quality), ("speed", speed), ("size", size)):
        if value is not None:
            setattr(card, name, value)
    card.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return write_report_card(model, card)


def plot_quality_speed(points: list[dict], path: str, *, ylabel: str, title: str = "",
                       extra: tuple[list[dict], str] | None = None) -> str:
    """PNG scatter of quality vs speed: points are {"label", "x" (decode tok/s), "y"}. `extra`
    (points, ylabel) adds a second panel beside it (e.g. every engine's perplexity next to the
    KL divergence that only jisu's runs have)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(points, ylabel)] + ([extra] if extra and extra[0] else [])
    rows = max(len(pts) for pts, _ in panels)  # legend lines under the plot
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.5 + 0.2 * rows), dpi=120,
                             squeeze=False, gridspec_kw={"bottom": min(0.6, 0.12 + 0.028 * rows)})
    markers = "osD^vP*Xh<>"
    for ax, (pts, label) in zip(axes[0], panels):
        for i, p in enumerate(pts):  # labels go in the legend: model file names are too long to annotate
            ax.scatter(p["x"], p["y"], s=50, marker=markers[i % len(markers)], label=p["label"])
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        if pts:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    lines = (title or "quality vs speed").splitlines()
    fig.suptitle("\n".join(textwrap.fill(line, 95 * len(panels)) for line in lines), fontsize=8)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
