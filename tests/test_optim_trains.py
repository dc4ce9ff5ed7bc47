"""muonkern.optim.Muon trains a small causal language model better than AdamW at equal steps (CPU).

Task: sequences from a fixed random hidden Markov model: 32 hidden states, each with 2 successors, each
emitting one of 8 of the 64 tokens (so a token is shared by ~4 states and the state has to be inferred
from the context). Training and validation streams are separate samples (different seeds) of the same
HMM. Losses on the validation stream, nats/token:
    uniform prediction                                  log 64 = 4.159
    unigram / bigram / trigram / 4-gram counts (1.3M training tokens, best add-alpha smoothing)
                                                        3.901 / 3.318 / 2.891 / 3.113
    Bayes optimal (forward algorithm on the true HMM)   2.677

Model: 2-layer pre-norm transformer, d_model 64, 4 heads, MLP 4x, context 64, untied head (111k
parameters, 98k of them in the hidden matrices). Both optimizers get the same initialization, the same
STEPS batches of BATCH fresh sequences, the same schedule (linear warm-up over WARMUP steps, constant,
linear decay to 0 over the last 30% of the steps; it scales every learning rate, Muon's adamw_lr too),
betas (0.9, 0.95) and no weight decay:
  - Muon: muon_param_groups(model): q/k/v/o and MLP matrices to Muon (lr); the token and position
    embeddings, the head and the LayerNorms to its AdamW part (adamw_lr).
  - AdamW: torch.optim.AdamW on every parameter.

Learning-rate sweep, offline (`python tests/test_optim_trains.py --seeds=0,1,2 --warmup=30
adamw:3e-2:- muon:0.05:0.1 ...`; seed k: init seed INIT_SEED + k and training stream TRAIN_SEED + 100k,
the validation stream fixed). Final validation loss, seeds 0 / 1 / 2 and mean, 2 threads:

  With the test's schedule (WARMUP = 30):
    AdamW lr   1e-2: 2.9987 2.9858 3.0310  mean 3.0052
               2e-2: 2.9496 2.9201 2.9500  mean 2.9399
               3e-2: 2.9264 2.9238 2.9475  mean 2.9326   <- best AdamW
               4e-2: 2.9852 2.9930 3.0525  mean 3.0102
               5e-2: 2.9862 3.0751 3.2552  mean 3.1055
    Muon lr | adamw_lr     1e-2     3e-2     1e-1     (means over the 3 seeds)
               0.01:        -     3.0761      -
               0.02:     2.9857   2.9080   2.9014
               0.05:     2.9283   2.8484   2.8449   <- best Muon (0.05, 0.1): 2.8408 2.8470 2.8470
               0.10:     2.9925   2.8651   2.8814
  Without warm-up (WARMUP = 0), for comparison (AdamW does better with the warm-up, Muon without):
    AdamW lr   3e-3: 3.3091   1e-2: 2.9982   1.5e-2: 2.9528   2e-2: 2.9419   2.5e-2: 2.9543
               3e-2: 2.9750   5e-2: 3.5801                                          (means)
    Muon lr | adamw_lr     1e-2     3e-2     1e-1
               0.01:     3.1453   3.0388      -
               0.02:     2.9604   2.8841   2.8842
               0.05:     2.9013   2.8344   2.8402
               0.10:     2.9763   2.8523   2.8714

Best against best (with warm-up): Muon 2.8449 vs AdamW 2.9326, a gap of 0.088 on average; per seed
0.086 / 0.077 / 0.100. MARGIN is about half the mean gap. The test runs seed 0 (Muon 2.8408, AdamW
2.9264 above). It also checks both losses are finite, below the uniform loss, and not below the Bayes
loss (which would mean the validation data leaked into training).
"""
from __future__ import annotations

import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import muonkern.optim as muon_optim

VOCAB, HIDDEN_STATES, SUCCESSORS, EMITS = 64, 32, 2, 8
CONTEXT = 64
D_MODEL, HEADS, LAYERS = 64, 4, 2
STEPS, BATCH = 300, 32
VAL_SEQUENCES = 512
WARMUP, DECAY_FRAC = 30, 0.3
BETAS = (0.9, 0.95)
HMM_SEED, TRAIN_SEED, VAL_SEED, INIT_SEED = 0, 1, 2, 0
THREADS = 2  # fixed, so the numbers do not depend on the machine (the CPU ns5 kernel's sums do)

# The best learning rates of the sweep above, and about half of the measured gap.
MUON_LR, MUON_ADAMW_LR = 0.05, 0.1
ADAMW_LR = 3e-2
MARGIN = 0.04


# ---- data ---------------------------------------------------------------------------------------
def make_hmm(seed: int = HMM_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse random transition (HIDDEN_STATES x HIDDEN_STATES) and emission (HIDDEN_STATES x VOCAB)
    matrices, rows summing to 1."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.zeros(HIDDEN_STATES, HIDDEN_STATES, dtype=torch.float64)
    emit = torch.zeros(HIDDEN_STATES, VOCAB, dtype=torch.float64)
    for h in range(HIDDEN_STATES):
        trans[h, torch.randperm(HIDDEN_STATES, generator=g)[:SUCCESSORS]] = \
            torch.rand(SUCCESSORS, generator=g, dtype=torch.float64) + 0.2
        emit[h, torch.randperm(VOCAB, generator=g)[:EMITS]] = torch.rand(EMITS, generator=g, dtype=torch.float64) + 0.2
    return trans / trans.sum(1, keepdim=True), emit / emit.sum(1, keepdim=True)


def sample(trans: torch.Tensor, emit: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n sequences of CONTEXT + 1 tokens (inputs and shifted targets), hidden start state uniform."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(HIDDEN_STATES, (n,), generator=g)
    out = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    for t in range(CONTEXT + 1):
        out[:, t] = torch.multinomial(emit[state], 1, generator=g).squeeze(1)
        state = torch.multinomial(trans[state], 1, generator=g).squeeze(1)
    return out


def bayes_loss(trans: torch.Tensor, emit: torch.Tensor, seqs: torch.Tensor) -> float:
    """Mean NLL (nats/token) of the targets seqs[:, 1:] under the true HMM (forward algorithm)."""
    belief = torch.full((seqs.shape[0], HIDDEN_STATES), 1.0 / HIDDEN_STATES, dtype=torch.float64)
    nll = torch.zeros((), dtype=torch.float64)
    for t in range(CONTEXT + 1):
        if t > 0:
            nll -= (belief @ emit).gather(1, seqs[:, t:t + 1]).log().sum()
        belief = belief * emit[:, seqs[:, t]].T
        belief = (belief / belief.sum(1, keepdim=True)) @ trans
    return nll.item() / (seqs.shape[0] * CONTEXT)


# ---- model --------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, length, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, length, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(Block(D_MODEL, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(seqs[:, :-1]).reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


# ---- training -----------------------------------------------------------------------------------
def make_optimizer(name: str, model: nn.Module, lr: float, adamw_lr: float | None) -> torch.optim.Optimizer:
    if name == "muon":
        groups = muon_optim.muon_param_groups(model)
        assert [g["use_muon"] for g in groups] == [True, False]
        assert sum(p.numel() for p in groups[0]["params"]) == LAYERS * 12 * D_MODEL ** 2  # q, k, v, o, MLP
        return muon_optim.Muon(groups, lr=lr, adamw_lr=adamw_lr, adamw_betas=BETAS)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)
    raise ValueError(name)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, constant, linear decay to 0 over the last DECAY_FRAC."""
    return min(1.0, (step + 1) / (warmup + 1), (steps - step) / (DECAY_FRAC * steps))


def train(name: str, lr: float, adamw_lr: float | None, train_seqs: torch.Tensor, val_seqs: torch.Tensor,
          init_seed: int = INIT_SEED, steps: int = STEPS, warmup: int = WARMUP) -> float:
    """Trains a fresh TinyLM for `steps` steps of BATCH sequences; returns the final validation loss.
    The schedule is a LambdaLR: in Muon's AdamW group `lr` is AdamW's learning rate, so it scales
    adamw_lr as well."""
    torch.manual_seed(init_seed)
    model = TinyLM()
    opt = make_optimizer(name, model, lr, adamw_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warmup))
    for step in range(steps):
        loss = lm_loss(model, train_seqs[step * BATCH:(step + 1) * BATCH])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    assert all(group["lr"] == 0 for group in opt.param_groups)  # every group was scheduled down to 0
    with torch.no_grad():
        return lm_loss(model, val_seqs).item()


def data(steps: int = STEPS, train_seed: int = TRAIN_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    trans, emit = make_hmm()
    return sample(trans, emit, steps * BATCH, train_seed), sample(trans, emit, VAL_SEQUENCES, VAL_SEED)


# ---- the test -----------------------------------------------------------------------------------
@pytest.fixture
def cpu_settings():
    """Fixed thread count and deterministic algorithms for this test; restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_muon_trains_lm_better_than_adamw(cpu_settings):
    train_seqs, val_seqs = data()
    muon = train("muon", MUON_LR, MUON_ADAMW_LR, train_seqs, val_seqs)
    adamw = train("adamw", ADAMW_LR, None, train_seqs, val_seqs)
    uniform, bayes = math.log(VOCAB), bayes_loss(*make_hmm(), val_seqs)
    for name, loss in (("muon", muon), ("adamw", adamw)):
        assert math.isfinite(loss) and loss < uniform, f"{name}: validation loss {loss} (uniform: {uniform:.3f})"
        assert loss > bayes - 0.01, f"{name}: validation loss {loss:.4f} below the Bayes loss {bayes:.4f}"
    assert muon < adamw - MARGIN, f"Muon {muon:.4f} vs AdamW {adamw:.4f}: gap below the margin {MARGIN}"


# ---- the offline sweep ----------------------------------------------------------------------------
def _sweep(argv: list[str]) -> None:
    """argv: runs as name:lr:adamw_lr ("-" for none), and optionally --seeds=0,1,2 (seed k: model init
    INIT_SEED + k, training stream TRAIN_SEED + 100 k; the validation stream stays the same) and
    --warmup=N (default WARMUP)."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    seeds, warmup = [0], WARMUP
    for arg in [a for a in argv if a.startswith("--seeds=")]:
        seeds = [int(k) for k in arg.split("=", 1)[1].split(",")]
    for arg in [a for a in argv if a.startswith("--warmup=")]:
        warmup = int(arg.split("=", 1)[1])
    trans, emit = make_hmm()
    streams = {k: data(train_seed=TRAIN_SEED + 100 * k) for k in seeds}
    bayes = bayes_loss(trans, emit, streams[seeds[0]][1])
    print(f"uniform {math.log(VOCAB):.4f}  bayes-optimal {bayes:.4f}", flush=True)
    runs = [(name, float(lr), None if alr == "-" else float(alr))
            for name, lr, alr in (spec.split(":") for spec in argv if not spec.startswith("--"))]
    for name, lr, adamw_lr in runs:
        t0 = time.perf_counter()
        losses = [train(name, lr, adamw_lr, *streams[k], init_seed=INIT_SEED + k, warmup=warmup) for k in seeds]
        print(f"{name:5s} lr={lr:<8g} adamw_lr={adamw_lr!s:<8} val=" + " ".join(f"{v:.4f}" for v in losses)
              + f"  mean={sum(losses) / len(losses):.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    _sweep(sys.argv[1:])
