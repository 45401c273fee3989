"""`lowrank:rank=R`: every decoder linear W replaced by a rank-R product A B found by the SVD of W
whitened by its calibration inputs (SVD-LLM / ASVD style), layer by layer on the inputs of the layers
already factored; the factors are kept as int8 (one float16 scale per row) by the quantization step
that follows, which quantizes the rest of the model (embedding, head) as its recipe says."""
from __future__ import annotations

from ..errors import JisuError
from ..kernels.lowrank import LowRankWeight
from ..models.layers import linear_names
from .spec import FormatSpec
from .steps import transform

_ERR_SPEC = FormatSpec("int", 8, None)  # the layer log's RTN comparison


def saving_rank(N: int, K: int) -> int:
    """The largest R whose factors hold fewer values than the [N, K] matrix: R (N + K) < N K."""
    return (N * K - 1) // (N + K)


def linear_shapes(cfg) -> dict:
    """Decoder linear short name -> (N, K)."""
    E, F = cfg.hidden_size, cfg.intermediate_size
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (nq, E), "k_proj": (nkv, E), "v_proj": (nkv, E), "o_proj": (E, nq), "gate_proj": (F, E),
            "up_proj": (F, E), "down_proj": (E, F)}


@transform("lowrank", before=True, after=False, calibrated=True)
class LowRankStep:
    form = "lowrank:rank=R"

    def parse(self, rest: str, fail):
        key, eq, value = rest.partition("=")
        if key != "rank" or not eq or not value.isdigit() or int(value) < 1:
            raise fail("R must be a whole number of at least 1")
        return int(value)

    def check(self, rank: int, cfg) -> None:
        for short, (N, K) in linear_shapes(cfg).items():
            top = saving_rank(N, K)
            if rank > top:
                raise JisuError(f"lowrank:rank={rank}: {short} is {N}x{K}; its rank-{rank} factors hold "
                                f"{rank * (N + K)} values, not fewer than its {N * K} "
                                f"(saving bytes needs rank <= {top})")

    def apply(self, rank: int, ctx) -> dict:
        import torch

        from .lowrank import Whitening, stored_factors
        from .methods import LayerJob, group_layer
        from .observe import compression_model, embed_all, model_form
        from .pipeline import Quantized

        if ctx.calib_ids is None:
            raise JisuError("lowrank: needs calibration text")
        cfg = ctx.cfg

        def factor_group(weights, H, specs, step):
            white = Whitening(H)
            return [LowRankWeight(None, stored_factors(w, rank, white)) for w in weights]

        model = compression_model(cfg, model_form(cfg, dict(ctx.weights)))
        out = Quantized(cfg, {}, {})
        names = linear_names(cfg)
        specs = {n: _ERR_SPEC for n in names}
        with torch.no_grad():
            X = embed_all(model, ctx.calib_ids, 8)
            for i in range(cfg.num_layers):
                group_layer(LayerJob(model, {}, i, X, specs, None, out, 8, factor_group))
        err = 0.0
        for n in names:
            ctx.weights[n] = out.tensors[n]
            err += out.layers[n]["err"]
        dense = sum(N * K for N, K in linear_shapes(cfg).values()) * cfg.num_layers
        values = sum(rank * (N + K) for N, K in linear_shapes(cfg).values()) * cfg.num_layers
        return {"rank": rank, "linear_values": values, "dense_values": dense, "kept": values / dense,
                "layer_err": err}
