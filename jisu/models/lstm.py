"""The LSTM language model (embedding -> LSTM layers -> projection -> linear head, tied or not), the
small student that distillation trains from a transformer teacher. Trained through torch.nn.LSTM;
run through jisu.kernels.ops linears (packed int8 / int4 weights included) with torch gate math."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import JisuError, UnsupportedError
from ..kernels import ops
from ..kernels.packed import PackedF32, PackedWeight

# --- architecture declaration (jisu.models registers it; the loaders read it) --------------------------
HF_TYPES: dict[str, str] = {}   # no HF / GGUF files of this architecture: only jisu artifacts
GGUF_ARCHS: tuple[str, ...] = ()
GGUF_LAYER_NAMES: dict[str, str] = {}
ARCHS = ("lstm",)               # ModelConfig.arch names that are neither an HF type nor a GGUF architecture
NORM_OFFSET = 0.0
NATIVE = False                  # run by jisu.engine.recurrent, not the transformer step


def config_from_hf(d: dict, where: str) -> ModelConfig:
    raise UnsupportedError(f"{where}: LSTM models are read from jisu artifacts only")


def config_from_gguf(metadata: dict, shapes: dict, where: str) -> ModelConfig:
    raise UnsupportedError(f"{where}: LSTM models are read from jisu artifacts only")


def load_transform(cfg: ModelConfig, source: str, name: str):
    return None


# --- end of the architecture declaration ------------------------------------------------------------

EMBED, HEAD, PROJ = "model.embed_tokens.weight", "lm_head.weight", "model.proj.weight"
STUDENT_FORM = "lstm:layers=N,hidden=H[,tied=0|1]"
MAX_LAYERS, MAX_HIDDEN = 16, 8192


def w_ih(layer: int) -> str:
    return f"model.lstm.weight_ih_l{layer}"


def w_hh(layer: int) -> str:
    return f"model.lstm.weight_hh_l{layer}"


def b_ih(layer: int) -> str:
    return f"model.lstm.bias_ih_l{layer}"


def b_hh(layer: int) -> str:
    return f"model.lstm.bias_hh_l{layer}"


@dataclass(frozen=True)
class LSTMSpec:
    layers: int = 2
    hidden: int = 768
    tied: bool = True

    def __post_init__(self):
        if not (isinstance(self.layers, int) and 1 <= self.layers <= MAX_LAYERS):
            raise JisuError(f"student: layers={self.layers!r} must be in [1, {MAX_LAYERS}] ({STUDENT_FORM})")
        if not (isinstance(self.hidden, int) and 32 <= self.hidden <= MAX_HIDDEN and self.hidden % 32 == 0):
            raise JisuError(f"student: hidden={self.hidden!r} must be a multiple of 32 in [32, {MAX_HIDDEN}] "
                            f"({STUDENT_FORM})")

    @property
    def text(self) -> str:
        return f"lstm:layers={self.layers},hidden={self.hidden},tied={int(self.tied)}"


def parse_student(text: str) -> LSTMSpec:
    """LSTMSpec of "lstm:layers=2,hidden=768[,tied=0|1]" (keys in any order, each at most once)."""
    bad = JisuError(f"student {text!r}: expected {STUDENT_FORM}, e.g. lstm:layers=2,hidden=768")
    if not isinstance(text, str):
        raise bad
    kind, _, rest = text.strip().partition(":")
    if kind.strip().lower() != "lstm":
        raise bad
    kw: dict = {}
    for part in rest.split(",") if rest.strip() else []:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or key not in ("layers", "hidden", "tied") or key in kw or not re.fullmatch(r"\d{1,6}", value):
            raise bad
        kw[key] = int(value)
    if "layers" not in kw or "hidden" not in kw or kw.get("tied", 1) not in (0, 1):
        raise bad
    if "tied" in kw:
        kw["tied"] = bool(kw["tied"])
    return LSTMSpec(**kw)


def lstm_config(spec: LSTMSpec, teacher_cfg: ModelConfig) -> ModelConfig:
    """The student's ModelConfig: the teacher's vocabulary, width (hidden_size = the embedding's),
    context and special tokens; intermediate_size = head_dim = the LSTM's hidden size (the engine
    keeps one [hidden] h and c per layer and position where a transformer keeps K and V)."""
    return ModelConfig(arch="lstm", vocab_size=teacher_cfg.vocab_size, hidden_size=teacher_cfg.hidden_size,
                       intermediate_size=spec.hidden, num_layers=spec.layers, num_heads=1, num_kv_heads=1,
                       head_dim=spec.hidden, max_position=teacher_cfg.max_position, tie_embeddings=spec.tied,
                       bos_token_id=teacher_cfg.bos_token_id, eos_token_ids=teacher_cfg.eos_token_ids)


def expected_shapes(cfg: ModelConfig):
    """(name, shape, required) of every weight (the loaders check a file against its config)."""
    V, D, H = cfg.vocab_size, cfg.hidden_size, cfg.head_dim
    for i in range(cfg.num_layers):
        yield from [(w_ih(i), (4 * H, D if i == 0 else H), True), (w_hh(i), (4 * H, H), True),
                    (b_ih(i), (4 * H,), True), (b_hh(i), (4 * H,), True)]
    yield PROJ, (D, H), H != D
    yield HEAD, (V, D), not cfg.tie_embeddings


def linear_names(cfg: ModelConfig) -> list[str]:
    """The 2-D matrices compression quantizes per matrix (the embedding and head are its tables)."""
    names = [n for i in range(cfg.num_layers) for n in (w_ih(i), w_hh(i))]
    return names + ([PROJ] if cfg.head_dim != cfg.hidden_size else [])


def _check_lstm_config(cfg: ModelConfig) -> None:
    if cfg.arch != "lstm" or cfg.head_dim != cfg.intermediate_size or cfg.num_kv_heads != 1:
        raise JisuError(f"model config: not an LSTM config (arch {cfg.arch}, head_dim {cfg.head_dim}, "
                        f"intermediate_size {cfg.intermediate_size})")


class LSTMRuntime:
    """The weights as inference runs them: every matrix a PackedWeight (float32 ones viewed in place,
    so the native kernel computes each row independently of the others), the two biases summed."""

    def __init__(self, cfg: ModelConfig, w: dict):
        def packed(t):
            return t if isinstance(t, PackedWeight) else PackedF32(t.detach())

        L = cfg.num_layers
        self.H = cfg.head_dim
        self.w_ih = [packed(w[w_ih(i)]) for i in range(L)]
        self.w_hh = [packed(w[w_hh(i)]) for i in range(L)]
        self.bias = [(w[b_ih(i)].detach().float() + w[b_hh(i)].detach().float()).contiguous() for i in range(L)]
        self.proj = packed(w[PROJ]) if PROJ in w else None
        table = w[EMBED]
        self.embed = table if isinstance(table, PackedWeight) else table.detach().float()
        head = w.get(HEAD, table)
        self.head = head if head is table and isinstance(table, PackedWeight) else packed(head)

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[N] token ids -> [N, D] float32."""
        if isinstance(self.embed, PackedWeight):
            return self.embed.rows(ids)
        return self.embed.index_select(0, ids)

    def input_gates(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[N, in] -> [N, 4H]: W_ih x + b_ih + b_hh for every token of a chunk at once."""
        return ops.linear(x, self.w_ih[layer], self.bias[layer])

    def cell(self, layer: int, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """One time step of rows [M]: gx [M, 4H] (input_gates), h, c [M, H] -> new (h, c). Gate
        order i, f, g, o (torch.nn.LSTM's)."""
        H = self.H
        g = ops.linear(h, self.w_hh[layer])
        g += gx
        s = torch.sigmoid(g)
        c = torch.addcmul(s[:, H:2 * H] * c, s[:, :H], torch.tanh(g[:, 2 * H:3 * H]))
        h = s[:, 3 * H:] * torch.tanh(c)
        return h, c

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Top layer's h [M, H] -> logits [M, V]."""
        if self.proj is not None:
            h = ops.linear(h, self.proj)
        return ops.linear(h, self.head)


class LSTMModel(nn.Module):
    """Built from float tensors (or from nothing: a fresh student) it is a trainable torch module
    (nn.Embedding, nn.LSTM, nn.Linear; forward is differentiable). Built from loaded weights that
    hold packed (quantized) matrices it is inference-only: forward runs LSTMRuntime. `w` maps
    every weight name to what the model computes with (tensors or packed weights)."""

    RECURRENT = True   # jisu.engine.runner.make_runner gives it the recurrent runner

    def __init__(self, cfg: ModelConfig, weights: dict | None = None):
        super().__init__()
        _check_lstm_config(cfg)
        self.cfg = cfg
        V, D, H, L = cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.num_layers
        self.trainable = weights is None or all(isinstance(t, torch.Tensor) for t in weights.values())
        self._runtime: LSTMRuntime | None = None
        if not self.trainable:
            self.model = self.lm_head = None
            self.w = dict(weights)
            return
        dev = "meta" if weights is not None else None   # no memory for values about to be replaced
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, D, device=dev)
        self.model.lstm = nn.LSTM(D, H, L, batch_first=True, device=dev)
        self.model.proj = nn.Linear(H, D, bias=False, device=dev) if H != D else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, V, bias=False, device=dev)
        if weights is not None:
            state = {n: t.float() for n, t in weights.items() if not (n == HEAD and cfg.tie_embeddings)}
            missing = set(self.state_dict()) - set(state)
            if missing or set(state) - set(self.state_dict()):
                raise JisuError(f"LSTM weights: missing {sorted(missing)[:3]}, unknown "
                                f"{sorted(set(state) - set(self.state_dict()))[:3]}")
            self.load_state_dict(state, assign=True)
        self.w = self.weights()

    @property
    def spec(self) -> LSTMSpec:
        return LSTMSpec(self.cfg.num_layers, self.cfg.head_dim, self.cfg.tie_embeddings)

    def weights(self) -> dict[str, torch.Tensor]:
        """name -> tensor of every stored weight (the parameters' current values, no copies)."""
        if not self.trainable:
            return dict(self.w)
        return {n: p.detach() for n, p in self.state_dict(keep_vars=True).items()}

    def runtime(self) -> LSTMRuntime:
        """The inference form of the current weights (trainable: rebuilt on each call, since
        training changes the biases' sum; inference-only: built once)."""
        if self.trainable:
            return LSTMRuntime(self.cfg, self.weights())
        if self._runtime is None:
            self._runtime = LSTMRuntime(self.cfg, self.w)
        return self._runtime

    def forward(self, ids: torch.Tensor, state=None):
        """ids [B, T] -> (logits float32 [B, T, V], state (h, c) each [layers, B, hidden])."""
        if self.trainable:
            x = self.model.embed_tokens(ids)
            out, state = self.model.lstm(x, state)
            if self.model.proj is not None:
                out = self.model.proj(out)
            head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            return torch.nn.functional.linear(out, head).float(), state
        return self.run_runtime(self.runtime(), ids, state)

    def run_runtime(self, rt: LSTMRuntime, ids: torch.Tensor, state=None):
        """forward through `rt` (the inference kernels), one time step after another."""
        B, T = ids.shape
        L, H = self.cfg.num_layers, self.cfg.head_dim
        if state is None:
            h0 = c0 = torch.zeros(L, B, H)
        else:
            h0, c0 = (s.float() for s in state)
        x = rt.embed_rows(ids.reshape(-1)).view(B, T, -1)
        hs, cs = [], []
        with torch.no_grad():
            for layer in range(L):
                gx = rt.input_gates(layer, x.reshape(B * T, -1)).view(B, T, -1)
                h, c = h0[layer], c0[layer]
                out = torch.empty(B, T, H)
                for t in range(T):
                    h, c = rt.cell(layer, gx[:, t], h, c)
                    out[:, t] = h
                hs.append(h)
                cs.append(c)
                x = out
            logits = rt.logits(x.reshape(B * T, H)).view(B, T, -1)
        return logits, (torch.stack(hs), torch.stack(cs))


MODEL = LSTMModel


def student_from_teacher(spec: LSTMSpec, teacher_cfg: ModelConfig, embed) -> LSTMModel:
    """A fresh trainable student of `spec` on the teacher's vocabulary: its embedding (and an untied
    head) start as the teacher's embedding [V, D] (a tensor or a packed weight); the LSTM has
    torch's initialisation (seed torch first for a reproducible one) with forget-gate biases 1."""
    if not isinstance(embed, torch.Tensor):
        embed = embed.dequantize() if hasattr(embed, "dequantize") else torch.as_tensor(embed)
    V, D = teacher_cfg.vocab_size, teacher_cfg.hidden_size
    if embed.dim() != 2 or tuple(embed.shape) != (V, D):
        raise JisuError(f"student: the teacher's embedding is {tuple(embed.shape)}, its config says ({V}, {D}) "
                        f"(the student takes the teacher's vocabulary)")
    cfg = lstm_config(spec, teacher_cfg)
    model = LSTMModel(cfg)
    H = spec.hidden
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed.float())
        if model.lm_head is not None:
            model.lm_head.weight.copy_(embed.float())
        for i in range(spec.layers):
            getattr(model.model.lstm, f"bias_ih_l{i}")[H:2 * H] = 1.0
            getattr(model.model.lstm, f"bias_hh_l{i}")[H:2 * H] = 0.0
    return model
