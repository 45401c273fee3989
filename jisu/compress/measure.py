"""Quality of a compressed model against its source on held-out chunks: mean KL(source || model)
per token, top-1 agreement and perplexities. The math comes from jisu.eval.quality when that
module is there; the small fallbacks below compute the same quantities."""
from __future__ import annotations

import torch

try:  # the report card's functions (one definition of KLD for the whole project)
    from ..eval.quality import kl_divergence, log_probs, summarize, token_nll
except ImportError:  # pragma: no cover - only without jisu.eval
    def log_probs(logits):
        return torch.log_softmax(logits.float(), dim=-1)

    def kl_divergence(ref, lp):
        ref, diff = ref.double(), ref.double() - lp.double()
        return torch.where(torch.isneginf(ref), torch.zeros_like(diff), ref.exp() * diff).sum(-1)

    def token_nll(lp, targets):
        return -lp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()

    def summarize(values):
        v = values.double().flatten()
        return {"mean": v.mean().item(), "median": torch.quantile(v, 0.5).item(),
                "p99": torch.quantile(v, 0.99).item(), "max": v.max().item()}


ROWS = 32  # positions per KL block


class ReferenceLogprobs:
    """The source model's log-probs on the held-out chunks, computed once, in full precision, at
    the start of compression (the source is in memory then anyway) and kept in an anonymous
    temporary file, so the source never has to sit next to the compressed model to measure it.
    The forward runs layer by layer over all chunks (jisu.compress.forward, exact mode: packed
    source weights are decoded to float32 one matrix at a time)."""

    def __init__(self, cfg, weights: dict, chunks: torch.Tensor, folder: str | None = None, progress: bool = False):
        import tempfile

        from tqdm import tqdm

        from .forward import HEAD, EMBED, Runner, as_float, model_form

        self.chunks = chunks
        C, T = chunks.shape
        self._file = tempfile.TemporaryFile(dir=folder)  # unlinked at once: gone even after a crash
        runner = Runner(cfg, model_form(cfg, weights), exact=True)
        with torch.inference_mode():
            x = runner.embed(chunks)
            for i in tqdm(range(cfg.num_layers), desc="reference log-probs", unit="layer", disable=not progress,
                          leave=False):
                x = runner.layer(i, x)
            h = runner.final_hidden(x)
            del x
            head = as_float(runner.w[HEAD if HEAD in runner.w else EMBED])
            self.V = head.shape[0]
            for c in range(C):
                lp = log_probs(runner.head(h[c:c + 1], weight=head)[0, :-1])
                self._file.write(lp.contiguous().numpy().tobytes())
        self._file.flush()
        self._row = (T - 1) * self.V * 4

    def __getitem__(self, c: int) -> torch.Tensor:
        import numpy as np

        self._file.seek(c * self._row)
        data = np.frombuffer(self._file.read(self._row), dtype=np.float32)
        return torch.from_numpy(data.copy()).view(-1, self.V)

    def close(self) -> None:
        self._file.close()


@torch.inference_mode()
def compare(reference, model, chunks: torch.Tensor, progress: bool = False) -> dict:
    """reference: a ReferenceLogprobs for these chunks, or a model; model: a jisu model
    (forward(tokens, cache) / new_cache(batch, len)). chunks: [C, T] token ids; each chunk is
    scored with a fresh cache, T-1 predictions per chunk."""
    from tqdm import tqdm

    kls, top1, nll_m, nll_r = [], [], [], []
    for c, chunk in enumerate(tqdm(chunks, desc="measuring KLD", unit="chunk", disable=not progress, leave=False)):
        tok = chunk[None]
        if isinstance(reference, ReferenceLogprobs):
            lr = reference[c]
        else:
            lr = log_probs(reference.forward(tok, reference.new_cache(1, tok.shape[1]))[0, :-1])
        lm = log_probs(model.forward(tok, model.new_cache(1, tok.shape[1]))[0, :-1])
        target = chunk[1:]
        for r0 in range(0, lr.shape[0], ROWS):  # float64 KL over [rows, vocab]: bounded memory
            a, b = lr[r0:r0 + ROWS], lm[r0:r0 + ROWS]
            kls.append(kl_divergence(a, b))
            top1.append(a.argmax(-1) == b.argmax(-1))
            nll_m.append(token_nll(b, target[r0:r0 + ROWS]))
            nll_r.append(token_nll(a, target[r0:r0 + ROWS]))
        del lr, lm
    kl = torch.cat(kls)
    s = summarize(kl)
    return {"kld_mean": s["mean"], "kld_median": s["median"], "kld_p99": s["p99"], "kld_max": s["max"],
            "top1_agreement": torch.cat(top1).double().mean().item(),
            "perplexity": torch.cat(nll_m).mean().exp().item(),
            "reference_perplexity": torch.cat(nll_r).mean().exp().item(),
            "chunks": int(chunks.shape[0]), "ctx": int(chunks.shape[1]), "tokens_scored": int(kl.numel())}
