"""Quality of a compressed model against its source on held-out chunks: mean KL(source || model)
per token, top-1 agreement and perplexities (the math of jisu.eval.quality)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..eval.quality import kl_divergence, summarize, token_nll
from ..memory import trim_heap
from ..models.layers import HEAD
from .observe import CTX, ReferenceNumerics, compression_model, model_form

ROWS = 32            # positions per KL block
PIECE = 64           # tokens per forward call of the measured model
VOCAB_BLOCK = 8192   # LM head rows decoded at a time for the reference


def log_probs_(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last axis, in place (float32 logits; no second [T, V] buffer)."""
    logits = logits.float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _rows(table, v0: int, v1: int) -> torch.Tensor:
    if isinstance(table, torch.Tensor):
        return table[v0:v1].float()
    return table.rows(torch.arange(v0, v1))


class ReferenceLogprobs:
    """The source model's log-probs on the held-out chunks, computed once, in full precision, at
    the start of compression (the source is in memory then anyway) and kept in an anonymous
    temporary file, so the source never has to sit next to the compressed model to measure it.
    The forward runs layer by layer over all chunks (compression's exact numerics: packed source
    weights are decoded to float32 one matrix at a time)."""

    def __init__(self, cfg, weights: dict, chunks: torch.Tensor, folder: str | None = None, progress: bool = False):
        import tempfile

        from tqdm import tqdm

        self.chunks = chunks
        C, T = chunks.shape
        self._file = tempfile.TemporaryFile(dir=folder)  # unlinked at once: gone even after a crash
        model = compression_model(cfg, model_form(cfg, weights), ReferenceNumerics(exact=True))
        with torch.inference_mode():
            x = model.embed(chunks)
            for i in tqdm(range(cfg.num_layers), desc="reference log-probs", unit="layer", disable=not progress,
                          leave=False):
                x = model.layer(i, x, CTX)
            h = model.final_hidden(x)
            del x
            table = model.w[HEAD]
            self.V = table.shape[0]
            blocks = [(v0, min(v0 + VOCAB_BLOCK, self.V)) for v0 in range(0, self.V, VOCAB_BLOCK)]
            logits = torch.empty(T - 1, self.V)
            for c in range(C):
                for v0, v1 in blocks:  # the head's float32 rows a block at a time (never the whole matrix)
                    logits[:, v0:v1] = F.linear(h[c, :-1], _rows(table, v0, v1))
                lp = log_probs_(model.cap_logits(logits))
                self._file.write(memoryview(lp.numpy()).cast("B"))
            del logits, h
        self._file.flush()
        self._shape = (T - 1, self.V)

    def __getitem__(self, c: int) -> torch.Tensor:
        out = torch.empty(self._shape)
        self._file.seek(c * out.numel() * 4)
        self._file.readinto(memoryview(out.numpy()).cast("B"))
        return out

    def close(self) -> None:
        self._file.close()


def _model_log_probs(runner, tok: torch.Tensor) -> torch.Tensor:
    """Log-probs [T-1, V] of a [1, T] chunk from an engine runner (jisu.engine.runner), fed PIECE
    tokens at a time through one cache (the logits and the kernels' scratch stay a fraction of a
    whole chunk's)."""
    from ..engine.runner import sequence_logits

    return log_probs_(sequence_logits(runner, tok[0, :tok.shape[1] - 1].tolist(), chunk=PIECE))


@torch.inference_mode()
def compare(reference, model, chunks: torch.Tensor, progress: bool = False) -> dict:
    """reference: a ReferenceLogprobs for these chunks, or a model (run over each whole chunk);
    model: an engine runner. chunks: [C, T] token ids; each chunk is scored with a fresh cache,
    T-1 predictions per chunk."""
    from tqdm import tqdm

    kls, top1, nll_m, nll_r = [], [], [], []
    for c, chunk in enumerate(tqdm(chunks, desc="measuring KLD", unit="chunk", disable=not progress, leave=False)):
        tok = chunk[None]
        if isinstance(reference, ReferenceLogprobs):
            lr = reference[c]
        else:
            lr = log_probs_(reference.forward(tok, CTX)[0, :-1])
        lm = _model_log_probs(model, tok)
        target = chunk[1:]
        for r0 in range(0, lr.shape[0], ROWS):  # float64 KL over [rows, vocab]: bounded memory
            a, b = lr[r0:r0 + ROWS], lm[r0:r0 + ROWS]
            kls.append(kl_divergence(a, b))
            top1.append(a.argmax(-1) == b.argmax(-1))
            nll_m.append(token_nll(b, target[r0:r0 + ROWS]))
            nll_r.append(token_nll(a, target[r0:r0 + ROWS]))
        del lr, lm
        # freed chunk buffers back to the OS: a run's RSS was seen to climb by ~230 MB per chunk
        # here, the freed memory staying in the allocator (twice in eight runs, under load)
        trim_heap()
    kl = torch.cat(kls)
    s = summarize(kl)
    return {"kld_mean": s["mean"], "kld_median": s["median"], "kld_p99": s["p99"], "kld_max": s["max"],
            "top1_agreement": torch.cat(top1).double().mean().item(),
            "perplexity": torch.cat(nll_m).mean().exp().item(),
            "reference_perplexity": torch.cat(nll_r).mean().exp().item(),
            "chunks": int(chunks.shape[0]), "ctx": int(chunks.shape[1]), "tokens_scored": int(kl.numel())}
