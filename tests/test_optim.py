"""muonkern.optim.Muon on CPU: semantics against an independent reference and against
torch.optim.Muon, AdamW against torch.optim.AdamW, parameter grouping, aliasing, state_dict round
trip, errors.

The Muon reference below is KellerJordan/Muon's `muon_update` written from the formula in
muonkern/optim.py's docstring (per parameter, no batching, no foreach ops):

    buf = momentum * buf + (1 - momentum) * grad            (buf.lerp_(grad, 1 - momentum))
    u   = lerp(grad, buf, momentum) if nesterov else buf
    p  *= 1 - lr * weight_decay
    p  -= lr * scale * ns5(u)        scale = max(1, rows/cols)^0.5           ("original")
                                     scale = 0.2 * max(rows, cols)^0.5        ("match_rms_adamw")

with conv weights seen as (out, in*kh*kw), 3-D tensors per leading index and `split_rows` cutting
the rows into blocks (scale from the block shape). It calls `muonkern.ns5` for the
orthogonalization, so the only possible difference from the optimizer is how matrices are batched.

Tolerances:
  * One parameter per shape (the optimizer then calls ns5 on a batch of one matrix, or on exactly
    the experts / blocks of that one parameter, as the reference does): exact (rtol=0, atol=0).
    Measured: on CPU a (1, m, n) ns5 call equals the 2-D call bit for bit (0 differences in 1200
    random matrices of six shapes).
  * Several same-shape matrices batched into one ns5 call, compared with one 2-D ns5 call per
    matrix: the CPU bf16 batched matmul sometimes rounds differently from the 2-D one (measured: 2
    of 4800 matrices in batches of 8 differed, by at most 0.0117 = 1.5 bf16 ulps at magnitude
    [1, 2)). The ns5 output's entries are below ~1.2 in magnitude (singular values in ~[0.7, 1.2]),
    so we allow 4 bf16 ulps at [1, 2), BF16_NS5_ATOL = 2^-5 per entry, per step, scaled by
    lr * scale: the momentum buffers do not depend on the parameters, so such differences cannot
    compound beyond adding up step by step. The same test also compares with a reference that
    batches like the optimizer, exactly.
  * AdamW part vs torch.optim.AdamW (foreach=False and foreach=True): exact (measured 0 difference;
    both do the same float operations in the same order).
  * bf16 parameters: exact against the reference, also when the decay factor 1 - lr*wd is not a
    bf16 number (test_bf16_weight_decay_matches_reference: the optimizer scales low-precision tensors
    with Tensor.mul_, keeping the factor in fp32, where torch's CPU _foreach_mul_ would round it to
    bf16). The bf16 AdamW part is exact against torch.optim.AdamW(foreach=False) for the same reason.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import muonkern
from muonkern.ops.ns5_args import JORDAN_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
from muonkern.optim import Muon, muon_param_groups
from ns5_cases import shape_id
from reference import BF16_NS5_ATOL, TORCH_MUON_SHAPES, torch_muon_distance
from reference import muon_scale as ref_scale

EXACT = dict(rtol=0, atol=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: with 2 threads on a busy 2-core machine the CPU bf16 matmuls of
    ns5 were measured 300x slower (0.12 s instead of 0.3 ms for 32 x 64). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the reference ------------------------------------------------------------------------------

def ref_orthogonalize(u: torch.Tensor, split_rows, ns_steps, coefficients, per_matrix: bool):
    """ns5 of the update as Muon sees it; returns (result shaped like u, rows, cols of one matrix).

    per_matrix=False: one ns5 call on the whole view of this parameter (for a lone parameter that is
    exactly the optimizer's batch). per_matrix=True: one 2-D ns5 call per matrix (expert, block)."""
    view = u.reshape(u.shape[0], -1) if u.ndim == 4 else u      # conv: (out, in*kh*kw)
    if split_rows is not None:
        view = view.reshape(*view.shape[:-2], view.shape[-2] // split_rows, split_rows, view.shape[-1])
    rows, cols = view.shape[-2:]
    if per_matrix:
        mats = view.reshape(-1, rows, cols)
        out = torch.stack([muonkern.ns5(m, ns_steps, coefficients) for m in mats]).reshape(view.shape)
    else:
        out = muonkern.ns5(view, ns_steps, coefficients)
    return out.reshape(u.shape), rows, cols


def reference_muon(params, grads_per_step, *, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                   ns_steps=5, coefficients=None, adjust_lr="original", split_rows=None, per_matrix=False):
    """KellerJordan/Muon's muon_update + step, parameter by parameter; returns the final parameters."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, grad, buf in zip(params, grads, bufs):
            grad = grad.clone()
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp_(buf, momentum) if nesterov else buf
            ortho, rows, cols = ref_orthogonalize(update, split_rows, ns_steps, coefficients, per_matrix)
            p.mul_(1 - lr * weight_decay)
            p.add_(ortho, alpha=-(lr * ref_scale(rows, cols, adjust_lr)))
    return params


def make_params(gen, shapes, dtype=torch.float32):
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def make_grads(gen, shapes, steps, dtype=torch.float32):
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def run_muon(params, grads_per_step, groups=None, **options):
    """Runs the optimizer; `groups` (list of dicts of extra group options, one per parameter) or one group."""
    if groups is None:
        opt = Muon(params, **options)
    else:
        opt = Muon([{"params": [p], **g} for p, g in zip(params, groups)], **options)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


# ---- Muon semantics --------------------------------------------------------------------------------
SHAPES = {
    "wide": (16, 48),
    "tall": (48, 16),
    "square": (24, 24),
    "conv": (8, 3, 3, 3),        # orthogonalized as (8, 27)
    "experts": (4, 16, 32),      # 4 matrices of 16 x 32
}
STEPS = 3


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_matches_reference(gen, kind, nesterov, weight_decay, adjust_lr):
    shape = SHAPES[kind]
    params = make_params(gen, [shape])
    grads = make_grads(gen, [shape], STEPS)
    options = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, adjust_lr=adjust_lr)
    expected = reference_muon(params, grads, **options)
    run_muon(params, grads, **options)
    torch.testing.assert_close(params[0].detach(), expected[0], **EXACT)


def test_reference_distinguishes_options(gen):
    """The options of test_matches_reference matter: flipping any of them changes the result a lot."""
    shape = (48, 16)
    params = make_params(gen, [shape])
    grads = make_grads(gen, [shape], STEPS)
    base = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, adjust_lr="original")
    ref = reference_muon(params, grads, **base)[0]
    for change in [dict(nesterov=False), dict(weight_decay=0.0), dict(adjust_lr="match_rms_adamw")]:
        other = reference_muon(params, grads, **{**base, **change})[0]
        assert (other - ref).abs().max() > 1e-3, change


def test_conv_and_experts_are_not_flattened_otherwise(gen):
    """Conv kernels are (out, in*kh*kw) and 3-D tensors per expert: the step taken is far from what
    another reading of the tensor gives (relative Frobenius distance 0.3..0.8 measured, against
    the ~0.035 bf16 noise of ns5 itself; we ask for > 0.2)."""
    for shape, wrong_views in [((8, 3, 3, 3), [(24, 9), (8 * 3 * 3, 3)]),
                               ((4, 16, 32), [(64, 32), (4, 512)])]:
        params = make_params(gen, [shape])
        grads = make_grads(gen, [shape], 1)
        expected = reference_muon(params, grads, lr=0.05)[0]
        start = params[0].detach().clone()
        run_muon(params, grads, lr=0.05)
        torch.testing.assert_close(params[0].detach(), expected, **EXACT)
        step = (start - params[0].detach()) / 0.05   # scale 1 for (8, 27) and (16, 32)
        u = grads[0][0]  # first step, nesterov, zero buffer: u is a multiple of the gradient
        for view in wrong_views:
            wrong = muonkern.ns5(u.reshape(view)).reshape(shape) * max(1.0, view[0] / view[1]) ** 0.5
            assert (step - wrong).norm() / step.norm() > 0.2, view


def test_same_shape_matrices_batched(gen):
    """Several parameters of one matrix shape share one ns5 batch (2-D matrices and the experts of
    a 3-D tensor together): the same as orthogonalizing each matrix on its own, up to the bf16
    rounding of a batched matmul (module docstring), and exactly what a reference batching the
    same way gives."""
    shapes = [(16, 32), (16, 32), (4, 16, 32), (16, 32), (32, 16), (32, 16), (3, 16, 9), (16, 9)]
    params = make_params(gen, shapes)
    grads = make_grads(gen, shapes, STEPS)
    options = dict(lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr="match_rms_adamw")
    per_matrix = reference_muon(params, grads, per_matrix=True, **options)

    # A reference that batches like the optimizer: every (16, 32) matrix of every parameter in one
    # ns5 call, in parameter order, and the same for the other shapes.
    batched = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        updates = []
        for buf, g in zip(bufs, step_grads):
            buf.lerp_(g, 0.1)
            updates.append(g.lerp(buf, 0.9))
        for mat_shape in {s[-2:] for s in shapes}:
            idx = [i for i, s in enumerate(shapes) if s[-2:] == mat_shape]
            ortho = muonkern.ns5(torch.cat([updates[i].reshape(-1, *mat_shape) for i in idx]))
            ortho = ortho.split([updates[i].numel() // math.prod(mat_shape) for i in idx])
            for i, o in zip(idx, ortho):
                batched[i].mul_(1 - 0.05 * 0.1)
                batched[i].add_(o.view(shapes[i]), alpha=-(0.05 * ref_scale(*mat_shape, "match_rms_adamw")))

    run_muon(params, grads, **options)
    for p, b, ref, shape in zip(params, batched, per_matrix, shapes):
        torch.testing.assert_close(p.detach(), b, **EXACT)
        atol = STEPS * 0.05 * ref_scale(*shape[-2:], "match_rms_adamw") * BF16_NS5_ATOL
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_bf16_parameters_match_reference(gen, nesterov, weight_decay):
    """bf16 parameters and gradients (ns5 returns bf16, the elementwise work is in bf16). With
    lr * weight_decay = 2^-4 * 2^-2 the decay factor 1 - 2^-6 is exact in bf16 (the test below
    takes one that is not): exact."""
    shapes = [(16, 48), (48, 16), (8, 3, 3, 3), (4, 16, 32)]
    params = make_params(gen, shapes, torch.bfloat16)
    grads = make_grads(gen, shapes, STEPS, torch.bfloat16)
    options = dict(lr=2.0 ** -4, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    expected = reference_muon(params, grads, **options)
    run_muon(params, grads, **options)
    for p, e in zip(params, expected):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), e, **EXACT)


def test_bf16_weight_decay_matches_reference(gen):
    shapes = [(16, 48)]
    params = make_params(gen, shapes, torch.bfloat16)
    grads = make_grads(gen, shapes, STEPS, torch.bfloat16)
    options = dict(lr=0.02, weight_decay=0.1)   # 1 - lr * wd = 0.998, not a bf16 number
    expected = reference_muon(params, grads, **options)
    run_muon(params, grads, **options)
    torch.testing.assert_close(params[0].detach(), expected[0], **EXACT)


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_split_rows(gen, adjust_lr):
    """A (3*16, 32) matrix with split_rows=16: each 16 x 32 block orthogonalized on its own, with
    the scale of a 16 x 32 block (1 or 0.2*sqrt(32)), not of the 48 x 32 matrix (sqrt(1.5) or
    0.2*sqrt(48))."""
    shape = (3 * 16, 32)
    params = make_params(gen, [shape])
    grads = make_grads(gen, [shape], STEPS)
    options = dict(lr=0.05, momentum=0.9, adjust_lr=adjust_lr)
    start = params[0].detach().clone()
    blocks_alone = reference_muon(params, grads, split_rows=16, per_matrix=True, **options)[0]
    blocks_batched = reference_muon(params, grads, split_rows=16, per_matrix=False, **options)[0]
    whole = reference_muon(params, grads, **options)[0]
    run_muon(params, grads, groups=[{"split_rows": 16}], **options)
    got = params[0].detach()
    # The optimizer puts the 3 blocks in one ns5 batch: exactly the batched reference; the blocks
    # one by one (2-D ns5 calls) up to the bf16 rounding of a batched matmul (module docstring).
    torch.testing.assert_close(got, blocks_batched, **EXACT)
    atol = STEPS * 0.05 * ref_scale(16, 32, adjust_lr) * BF16_NS5_ATOL
    torch.testing.assert_close(got, blocks_alone, rtol=0, atol=atol)
    # Orthogonalizing the whole 48 x 32 matrix (and its scale) is far away: the steps differ by
    # ~0.5 in relative Frobenius norm (measured 0.46..0.47 for ns5 alone).
    assert (got - whole).norm() / (got - start).norm() > 0.2


def test_split_rows_conv_and_experts(gen):
    """split_rows applies to the matrix view: conv (out, in*kh*kw) rows and each expert's rows."""
    shapes = [(8, 2, 3, 3), (2, 8, 12)]
    params = make_params(gen, shapes)
    grads = make_grads(gen, shapes, 2)
    expected = reference_muon(params, grads, split_rows=4, lr=0.05)
    run_muon(params, grads, groups=[{"split_rows": 4}] * 2, lr=0.05)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, **EXACT)


@pytest.mark.parametrize("coefficients", ["polar_express", "list"])
def test_coefficients(gen, coefficients):
    """coefficients="polar_express" and a list of (a, b, c) triples run, match the reference with the
    same schedule, and give a different result from "jordan"."""
    if coefficients == "list":
        coefficients = [JORDAN_COEFFICIENTS] * 3 + [(2.0, -1.5, 0.5)] * 2
        flat = [c for t in coefficients for c in t]
    else:
        flat = [c for t in POLAR_EXPRESS_COEFFICIENTS for c in t]
    shape = (16, 40)
    params = make_params(gen, [shape])
    grads = make_grads(gen, [shape], 2)
    jordan = reference_muon(params, grads, lr=0.05)[0]
    expected = reference_muon(params, grads, lr=0.05, coefficients=flat)[0]
    run_muon(params, grads, lr=0.05, coefficients=coefficients)
    torch.testing.assert_close(params[0].detach(), expected, **EXACT)
    assert (params[0].detach() - jordan).abs().max() > 1e-3


def test_jordan_list_equals_preset(gen):
    params = make_params(gen, [(16, 40)])
    other = [nn.Parameter(params[0].detach().clone())]
    grads = make_grads(gen, [(16, 40)], 2)
    run_muon(params, grads, coefficients="jordan")
    run_muon(other, grads, coefficients=[JORDAN_COEFFICIENTS] * 5)
    assert torch.equal(params[0], other[0])


def test_ns_steps(gen):
    params = make_params(gen, [(16, 40)])
    grads = make_grads(gen, [(16, 40)], 2)
    expected = reference_muon(params, grads, ns_steps=3)[0]
    run_muon(params, grads, ns_steps=3)
    torch.testing.assert_close(params[0].detach(), expected, **EXACT)


def test_parameters_without_grad_are_skipped(gen):
    params = make_params(gen, [(16, 32), (16, 32), (7,)])
    before = [p.detach().clone() for p in params]
    opt = Muon(params)
    params[0].grad = torch.randn(16, 32, generator=gen)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    assert len(opt.state[params[1]]) == 0 and len(opt.state[params[2]]) == 0


# ---- AdamW part ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_adamw_matches_torch(gen, foreach):
    """A use_muon=False group (matrices included) and 1-D parameters of a default group follow
    torch.optim.AdamW with the same lr, betas, eps and weight decay: exactly (same float ops)."""
    hyper = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    shapes = [(12, 7), (5, 2, 3), (13,), (1,)]
    ours = make_params(gen, shapes)
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    bias = nn.Parameter(torch.randn(9, generator=gen))         # ndim 1 in a default group
    bias_theirs = nn.Parameter(bias.detach().clone())
    opt = Muon([{"params": ours, "use_muon": False}, {"params": [bias]}], lr=0.02,
               adamw_lr=hyper["lr"], adamw_betas=hyper["betas"], adamw_eps=hyper["eps"],
               adamw_weight_decay=hyper["weight_decay"])
    assert [g["use_muon"] for g in opt.param_groups] == [False, False]
    ref = torch.optim.AdamW(theirs + [bias_theirs], foreach=foreach, **hyper)
    for _ in range(5):
        for a, b in zip(ours + [bias], theirs + [bias_theirs]):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours + [bias], theirs + [bias_theirs]):
        torch.testing.assert_close(a.detach(), b.detach(), **EXACT)


def test_adamw_bf16_matches_torch_single_tensor(gen):
    """bf16 parameters: the same as torch.optim.AdamW(foreach=False), exactly. Scalar factors (beta2,
    1 - lr*wd) multiply in fp32 as Tensor.mul_ does; torch's CPU foreach AdamW rounds beta2 to bf16
    (0.95 -> 0.9492) and so differs in exp_avg_sq."""
    ours = make_params(gen, [(12, 7), (13,)], torch.bfloat16)
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon([{"params": ours, "use_muon": False}], adamw_lr=1e-2, adamw_weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.bfloat16)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **EXACT)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], **EXACT)


def test_adamw_parameter_joining_late_has_its_own_bias_correction(gen):
    """A parameter whose gradient appears only from step 3 on gets AdamW's step-1 bias correction then."""
    a, b = make_params(gen, [(6,), (6,)])
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt = Muon([a, b], adamw_lr=1e-2)
    ref_a = torch.optim.AdamW([a2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    ref_b = torch.optim.AdamW([b2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    for step in range(4):
        ga = torch.randn(6, generator=gen)
        a.grad, a2.grad = ga.clone(), ga.clone()
        ref_a.step()
        if step >= 2:
            gb = torch.randn(6, generator=gen)
            b.grad, b2.grad = gb.clone(), gb.clone()
            ref_b.step()
        opt.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


# ---- grouping -----------------------------------------------------------------------------------------
def test_default_grouping(gen):
    params = make_params(gen, [(8, 4), (3,), (2, 3, 4), (5,), (4, 2, 3, 3), ()])
    opt = Muon(params)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert [id(p) for p in muon] == [id(params[i]) for i in (0, 2, 4)]
    assert [id(p) for p in adamw] == [id(params[i]) for i in (1, 3, 5)]
    # The group's own options are kept in both halves.
    opt = Muon([{"params": params, "lr": 0.5, "adamw_lr": 0.25}])
    assert all(g["adamw_lr"] == 0.25 for g in opt.param_groups)
    # The group's lr is Muon's; its AdamW half runs at adamw_lr (the lr an LR scheduler then scales).
    assert [(g["use_muon"], g["lr"]) for g in opt.param_groups] == [(True, 0.5), (False, 0.25)]


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d, bias=False)


class _LM(nn.Module):
    def __init__(self, vocab=11, d=8, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.conv = nn.Conv1d(d, d, 3)
        self.final_norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_param_groups_lm(tied):
    model = _LM(tied=tied)
    groups = muon_param_groups(model, lr=0.03)
    # hidden matrices; the conv kernel in a group of its own, flattened; AdamW
    assert [(g["use_muon"], g.get("flatten")) for g in groups] == [(True, None), (True, True), (False, None)]
    assert groups[0]["lr"] == groups[1]["lr"] == 0.03 and "lr" not in groups[2]
    muon_ids = [id(p) for p in groups[0]["params"]]
    adamw_ids = [id(p) for p in groups[2]["params"]]
    hidden = [b.fc.weight for b in model.blocks] + [b.proj.weight for b in model.blocks]
    assert sorted(muon_ids) == sorted(id(p) for p in hidden)
    assert [id(p) for p in groups[1]["params"]] == [id(model.conv.weight)]
    expected_adamw = [model.embed.weight] + [p for b in model.blocks for p in (b.norm.weight, b.norm.bias, b.fc.bias)]
    expected_adamw += [model.conv.bias, model.final_norm.weight]
    if not tied:
        expected_adamw.append(model.lm_head.weight)
    assert sorted(adamw_ids) == sorted(id(p) for p in expected_adamw)
    everything = muon_ids + [id(model.conv.weight)] + adamw_ids
    assert len(everything) == len(set(everything)) == len(list(model.parameters()))
    if tied:
        assert adamw_ids.count(id(model.embed.weight)) == 1
    opt = Muon(groups)  # and the optimizer takes them as they are
    assert [g["use_muon"] for g in opt.param_groups] == [True, True, False]
    # In an AdamW group `lr` is AdamW's learning rate (adamw_lr unless the group sets lr), so that LR
    # schedulers scale both kinds of parameters.
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[2]["lr"] == opt.param_groups[2]["adamw_lr"] == 3e-4


@pytest.mark.parametrize("shape", [(8, 4, 3), (6, 2, 3, 3)], ids=["conv1d", "conv2d"])
def test_flatten_orthogonalizes_conv_kernels_whole(gen, shape):
    """flatten=True (muon_param_groups' conv group): a Conv1d kernel (out, in, k) is one (out, in*k)
    matrix like a Conv2d one, not a stack of `out` experts; without it a 3-D tensor is experts."""
    start = make_params(gen, [shape])
    grads = make_grads(gen, [shape], 2)
    want = reference_muon([start[0].reshape(shape[0], -1)], [[g[0].reshape(shape[0], -1)] for g in grads])
    flat = [nn.Parameter(start[0].detach().clone())]
    run_muon(flat, grads, groups=[{"flatten": True}])
    torch.testing.assert_close(flat[0].detach(), want[0].reshape(shape), **EXACT)
    if len(shape) == 3:  # the default: experts, as the reference does for 3-D
        experts = [nn.Parameter(start[0].detach().clone())]
        run_muon(experts, grads)
        torch.testing.assert_close(experts[0].detach(), reference_muon(start, grads)[0], **EXACT)
        assert not torch.allclose(experts[0], flat[0])


@pytest.mark.parametrize("head", ["lm_head", "head", "output", "classifier"])
def test_muon_param_groups_heads(head):
    """The head is found by the last part of its module name, also when nested (decoder.lm_head)."""
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6))
    model.decoder = nn.Module()
    setattr(model.decoder, head, nn.Linear(6, 3))
    groups = muon_param_groups(model)
    muon = {id(p) for p in groups[0]["params"]}
    adamw = {id(p) for p in groups[1]["params"]}
    assert muon == {id(model.body[0].weight), id(model.body[2].weight)}
    head_module = getattr(model.decoder, head)
    assert adamw == {id(model.body[0].bias), id(model.body[2].bias), id(head_module.weight), id(head_module.bias)}


def test_muon_param_groups_skips_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    groups = muon_param_groups(model)
    assert [id(p) for p in groups[0]["params"]] == [id(model[1].weight)]


# ---- no aliasing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_muon", [True, False], ids=["muon", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_no_aliasing(gen, nesterov, dtype, use_muon):
    """After step(): p.grad unchanged, the momentum buffer is exactly lerp(old, grad, 1 - momentum)
    (computed here on clones), and no two of p, p.grad and the state tensors share storage."""
    shapes = [(16, 32), (16, 32), (32, 8)] + ([] if use_muon else [(7,)])
    params = make_params(gen, shapes, dtype)
    momentum, betas = 0.9, (0.8, 0.95)
    opt = Muon([{"params": params, "use_muon": use_muon}], nesterov=nesterov, momentum=momentum,
               adamw_betas=betas, weight_decay=0.1, adamw_weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        grad_clones = [g.clone() for g in grads]
        old_state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params]
        opt.step()
        for p, g, g0, old in zip(params, grads, grad_clones, old_state):
            assert p.grad is g
            assert torch.equal(p.grad, g0), "step() modified p.grad"
            state = opt.state[p]
            if use_muon:
                old_buf = old.get("momentum_buffer", torch.zeros_like(g0))
                assert torch.equal(state["momentum_buffer"], torch.lerp(old_buf, g0, 1 - momentum))
                assert set(state) == {"momentum_buffer"}
            else:
                old_avg = old.get("exp_avg", torch.zeros_like(g0))
                old_sq = old.get("exp_avg_sq", torch.zeros_like(g0))
                assert torch.equal(state["exp_avg"], torch.lerp(old_avg, g0, 1 - betas[0]))
                expected_sq = (old_sq * betas[1]).addcmul(g0, g0, value=1 - betas[1])
                assert torch.equal(state["exp_avg_sq"], expected_sq)
                assert state["step"] == step + 1
            tensors = {"param": p, "grad": p.grad, **{k: v for k, v in state.items() if torch.is_tensor(v)}}
            for name, t in tensors.items():
                assert t.dtype == dtype, name
            ptrs = {name: t.untyped_storage().data_ptr() for name, t in tensors.items()}
            assert len(set(ptrs.values())) == len(ptrs), f"shared storage: {ptrs}"
        # ... nor with the tensors of the other parameters
        all_ptrs = [t.untyped_storage().data_ptr() for p in params
                    for t in [p, p.grad, *(v for v in opt.state[p].values() if torch.is_tensor(v))]]
        assert len(set(all_ptrs)) == len(all_ptrs)


# ---- state_dict -----------------------------------------------------------------------------------------
def _mlp(seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                             nn.Linear(24, 3))


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _optimizer(model):
    """The three Linear weights to Muon (an nn.Sequential names them 0, 3, 5: no head name), the
    LayerNorm and the biases to AdamW."""
    return Muon(muon_param_groups(model), lr=0.02, weight_decay=0.01, adamw_lr=1e-3, adamw_weight_decay=0.01)


def test_state_dict_round_trip_is_bit_identical():
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(6)]
    model = _mlp(1234)
    opt = _optimizer(model)
    _train(model, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = _mlp(1234)
    opt = _optimizer(model)
    _train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    del model, opt
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = _mlp(999)  # a fresh model, initialized differently
    opt = _optimizer(model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    _train(model, opt, batches[3:])
    resumed = [p.detach() for p in model.parameters()]
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)

    # Not vacuous: resuming with a fresh optimizer state (momentum and AdamW moments lost) differs.
    model = _mlp(999)
    model.load_state_dict(saved["model"])
    opt = _optimizer(model)
    _train(model, opt, batches[3:])
    assert not any(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))


def test_state_dict_contents(gen):
    params = make_params(gen, [(8, 4), (3,)])
    opt = Muon(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"}
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [g["use_muon"] for g in sd["param_groups"]] == [True, False]


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_muon", [True, False], ids=["muon", "adamw"])
def test_sparse_gradient_raises(use_muon):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": emb.parameters(), "use_muon": use_muon}])
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("shape", [(4, 4), (4,)], ids=["matrix", "vector"])
def test_complex_or_integer_parameter_raises(shape):
    for dtype in (torch.complex64, torch.int64):
        p = nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=dtype.is_complex)
        with pytest.raises(TypeError, match=f"real floating-point tensors, got {dtype}"):
            Muon([p])


def test_unknown_option_raises():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="betas"):
        Muon([{"params": [p], "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="nesterow"):
        Muon([{"params": [p], "use_muon": True, "nesterow": True}])


@pytest.mark.parametrize("kwargs,group,match", [
    (dict(adjust_lr="spectral"), {}, "adjust_lr"),
    (dict(momentum=1.0), {}, "momentum"),
    (dict(momentum=1.5), {}, "momentum"),
    (dict(lr=-0.1), {}, "lr"),
    (dict(adamw_lr=-0.1), {}, "lr"),
    (dict(), {"split_rows": 20}, "split_rows"),
    (dict(), {"split_rows": 0}, "split_rows"),
    (dict(coefficients="newton"), {}, "newton"),
    (dict(coefficients="polar_express", ns_steps=4), {}, "polar_express"),
    (dict(coefficients=[JORDAN_COEFFICIENTS] * 4), {}, "coefficients"),
    (dict(lr=float("nan")), {}, "lr must be a finite number"),
    (dict(weight_decay=float("inf")), {}, "weight_decay must be a finite number"),
    (dict(adamw_betas=(0.9, float("nan"))), {}, "adamw_betas"),
    (dict(), {"split_rows": 2.0}, "split_rows"),
    (dict(), {"split_rows": True}, "split_rows"),
], ids=["adjust_lr", "momentum1", "momentum1.5", "lr", "adamw_lr", "split_rows20", "split_rows0",
        "preset", "polar_steps", "list_length", "lr_nan", "wd_inf", "betas_nan", "split_rows_float",
        "split_rows_bool"])
def test_bad_options_raise(kwargs, group, match):
    p = nn.Parameter(torch.randn(48, 32))
    with pytest.raises(ValueError, match=match):
        Muon([{"params": [p], **group}], **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ns_steps=2.5), "ns_steps must be an int"),
    (dict(ns_steps=True), "ns_steps must be an int"),
    (dict(nesterov="no"), "nesterov must be True or False"),
    (dict(distribute=1), "distribute must be True or False"),
], ids=["ns_steps_float", "ns_steps_bool", "nesterov_str", "distribute_int"])
def test_bad_option_types_raise(kwargs, match):
    with pytest.raises(TypeError, match=match):
        Muon([nn.Parameter(torch.randn(8, 4))], **kwargs)


def test_bad_flatten_raises():
    with pytest.raises(TypeError, match="flatten"):
        Muon([{"params": [nn.Parameter(torch.randn(8, 4))], "flatten": "yes"}])


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", TORCH_MUON_SHAPES, ids=shape_id)
def test_matches_torch_optim_muon(gen, adjust_lr, shape):
    """Against torch.optim.Muon, an implementation that shares no code with this package (its own
    bf16 Newton-Schulz with fused addmm products, norm clamped at eps): the same update up to the
    bf16 rounding of the orthogonalization. After 10 steps, in units of lr * scale (`python
    bench/cpu_measurements.py muon-vs-torch`, 30 runs): worst 0.094; a momentum of 0.9 instead of
    0.95 moves it by at least 0.25. Budget 0.2."""
    distance = torch_muon_distance(gen, shape, adjust_lr)
    assert distance <= 0.2, distance


def test_failed_step_changes_nothing(gen):
    """The gradients of every group are checked before any group is stepped: a sparse gradient in
    the last group leaves the first group's parameters and state untouched."""
    w, b = nn.Parameter(torch.randn(8, 4, generator=gen)), nn.Parameter(torch.randn(8, generator=gen))
    emb = nn.Embedding(5, 3, sparse=True)
    opt = Muon([{"params": [w, b]}, {"params": [emb.weight], "use_muon": False}])
    before = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert not any(opt.state[p] for p in (w, b))


def test_takes_groups_a_scheduler_has_annotated():
    """Muon(other.param_groups) after an LR scheduler added its keys (initial_lr, ...) to them."""
    p = nn.Parameter(torch.randn(8, 4))
    first = Muon([p])
    torch.optim.lr_scheduler.OneCycleLR(first, max_lr=0.1, total_steps=10)
    assert "initial_lr" in first.param_groups[0] and "max_lr" in first.param_groups[0]
    second = Muon(first.param_groups)
    assert second.param_groups[0]["max_lr"] == 0.1


def test_empty_parameter_with_split_rows():
    Muon([{"params": [nn.Parameter(torch.empty(0, 3, 3, 3))], "split_rows": 4}]).step()


def test_use_muon_on_vector_raises():
    with pytest.raises(ValueError, match="ndim"):
        Muon([{"params": [nn.Parameter(torch.randn(5))], "use_muon": True}])


def test_group_lr_without_adamw_lr_warns():
    """{"params": model.parameters(), "lr": ...} as other optimizers take it: the biases would run at
    the optimizer's adamw_lr, not that lr, which the warning says."""
    layer = nn.Linear(4, 8)
    with pytest.warns(UserWarning, match="non-matrix parameters run AdamW at the optimizer's adamw_lr"):
        opt = Muon([{"params": layer.parameters(), "lr": 0.05}], adamw_lr=1e-3)
    assert [(g["use_muon"], g["lr"]) for g in opt.param_groups] == [(True, 0.05), (False, 1e-3)]


def test_split_rows_group_with_biases():
    """A group like {"params": attn.parameters(), "split_rows": 16} (a fused QKV weight and its bias):
    the default grouping sends the bias to AdamW, where split_rows has no meaning."""
    qkv = nn.Linear(32, 3 * 16)
    opt = Muon([{"params": qkv.parameters(), "split_rows": 16}])
    assert [(g["use_muon"], len(g["params"])) for g in opt.param_groups] == [(True, 1), (False, 1)]


def test_empty_matrix_parameter():
    empty = [nn.Parameter(torch.randn(0, 8)), nn.Parameter(torch.randn(4, 0))]
    opt = Muon(empty)
    for p in empty:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert [p.shape for p in empty] == [(0, 8), (4, 0)]


# ---- closure --------------------------------------------------------------------------------------------
def test_step_closure_returns_loss(gen):
    model = nn.Linear(6, 4)
    opt = Muon(model.parameters())
    x = torch.randn(5, 6, generator=gen)
    before = model.weight.detach().clone()
    calls = []

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()  # needs grad mode: step() runs under no_grad, the closure must not
        calls.append(loss)
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss is calls[0]
    assert not torch.equal(model.weight, before)
    assert opt.step() is None
