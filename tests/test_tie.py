"""Tie on FX graphs: detection, exact permutation, merge + real sharing, selection, reports, errors."""
import copy
import io

import onnx
import pytest
import torch
import torch.fx as fx
from conftest import assert_same_function, max_rel_error
from torch import nn

import fxfuse
from fxfuse.alignment import permute
from fxfuse.models import TinyDecoder
from fxfuse.verify import propagate_shapes
from fxfuse.report import count_macs
from fxfuse.feedforward import extract, find_feedforwards, find_in_extracted, group_feedforwards

ACTS = ["gelu", "gelu_tanh", "relu", "silu", "prelu", "swiglu"]


def tiny(act="gelu", layers=6, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return TinyDecoder(layers=layers, act=act, **kw).to(dtype).eval()


def ids(seed, batch=4, length=16):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def ff_params(model, i):
    return sum(p.numel() for p in model.blocks[i].ff.parameters())


@pytest.mark.parametrize("act", ACTS)
def test_every_ff_form_is_found_and_grouped(act):
    gm = fx.symbolic_trace(tiny(act, layers=4))
    ffs = find_feedforwards(gm)
    assert [ff.name for ff in ffs] == [f"blocks.{i}.ff" for i in range(4)]
    assert {ff.kind for ff in ffs} == {"swiglu" if act == "swiglu" else "mlp"}
    assert list(group_feedforwards(ffs).values()) == [[0, 1, 2, 3]]


class NotFF(nn.Module):
    """Linear pairs that must not be taken for FFs: a LayerNorm between, a channel-wise PReLU, a
    hidden value read twice."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.ln = nn.Linear(8, 16), nn.Linear(16, 8), nn.LayerNorm(16)
        self.b1, self.b2, self.prelu = nn.Linear(8, 16), nn.Linear(16, 8), nn.PReLU(16)
        self.c1, self.c2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.a2(self.ln(self.a1(x)))
        x = x + self.b2(self.prelu(self.b1(x)))
        h = torch.relu(self.c1(x))
        return x + self.c2(h) + h.sum(-1, keepdim=True)


def test_lookalikes_are_not_feedforwards():
    assert find_feedforwards(fx.symbolic_trace(NotFF())) == []


def test_groups_split_by_shape():
    model = tiny(layers=4)
    model.blocks[2].ff = type(model.blocks[0].ff)(64, 128)
    groups = group_feedforwards(find_feedforwards(fx.symbolic_trace(model.eval())))
    assert sorted(groups.values()) == [[0, 1, 3], [2]]


@pytest.mark.parametrize("act", ACTS)
def test_permuted_unmerged_ff_is_the_same_function(act):
    gm = fx.symbolic_trace(tiny(act, layers=2, dtype=torch.float64))
    ff = find_feedforwards(gm)[1]
    module = extract(gm, ff)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    ref = module(x)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    find_in_extracted(module).load(permute(ff.weights(), perm))
    assert not torch.equal(find_in_extracted(module).ups[0].weight, ff.ups[0].weight)
    assert max_rel_error(module(x), ref) <= 1e-12


def permuted_copies(act="relu", layers=4, dtype=torch.float64):
    """A decoder whose FFs 1..3 are FF 0 with its hidden neurons shuffled: the same function."""
    model = tiny(act, layers=layers, dtype=dtype)
    for i in range(1, 4):
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(i))
        src, dst = model.blocks[0].ff, model.blocks[i].ff
        with torch.no_grad():
            for name in ("fc1", "up"):
                if hasattr(src, name):
                    getattr(dst, name).weight.copy_(getattr(src, name).weight[perm])
                    if getattr(src, name).bias is not None:
                        getattr(dst, name).bias.copy_(getattr(src, name).bias[perm])
            dst.fc2.weight.copy_(src.fc2.weight[:, perm])
            dst.fc2.bias.copy_(src.fc2.bias)
            if isinstance(src.act, nn.PReLU):
                dst.act.weight.copy_(src.act.weight)
    return model


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_permute_merge_is_exact_on_permuted_copies_and_vanilla_is_not(act):
    model = permuted_copies(act)
    batches, x = [ids(s) for s in range(3)], ids(9)
    errors = {}
    for align in ("permute", "vanilla"):
        gm = fxfuse.optimize(model, (x,), tie=fxfuse.Tie(windows=[(0, 1, 2, 3)], calibration=batches, align=align))
        with torch.no_grad():
            errors[align] = max_rel_error(gm(ids(11)), model(ids(11)))
        assert fxfuse.report_of(gm).params_after == fxfuse.report_of(gm).params_before - 3 * ff_params(model, 0)
    assert errors["permute"] <= 1e-10
    assert errors["vanilla"] > 1e-2


def test_tied_weights_are_one_tensor_in_parameters_state_dict_and_checkpoint(tmp_path):
    model, x = tiny(), ids(0)
    gm = fxfuse.optimize(model, (x,), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[ids(1)]))
    removed = 2 * ff_params(model, 0)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    stored = lambda m: sum(t.numel() for t in m.state_dict().values())  # noqa: E731
    assert stored(gm) == stored(model) - removed
    sites = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("tied_ff")]
    assert len(sites) == 3 and len({n.target for n in sites}) == 1
    propagate_shapes(gm, (x,))  # the shared FF runs at all three sites: the arithmetic is unchanged
    assert count_macs(gm) == fxfuse.report_of(gm).macs_before > 0
    sizes = {}
    for name, m in (("orig", model), ("tied", gm)):
        torch.save(m.state_dict(), tmp_path / f"{name}.pt")
        sizes[name] = (tmp_path / f"{name}.pt").stat().st_size
    assert sizes["orig"] - sizes["tied"] >= 4 * removed * 0.99
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    fresh = copy.deepcopy(gm)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(torch.load(tmp_path / "tied.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(x), gm(x))


def test_onnx_stores_the_shared_ff_once(tmp_path):
    """One export: the three FFs' weight matrices appear once each in the file."""
    model, x = tiny(layers=3), ids(0)
    gm = fxfuse.optimize(model, (x,), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[ids(1)]))
    assert fxfuse.export_onnx(gm, (x,), tmp_path / "tied.onnx").error <= 1e-4
    shapes = [tuple(i.dims) for i in onnx.load(tmp_path / "tied.onnx").graph.initializer]
    assert shapes.count((256, 64)) == 1 and shapes.count((64, 256)) == 1 and shapes.count((256,)) == 1


@pytest.mark.slow
def test_onnx_initializers_shrink_by_two_ffs(tmp_path):
    model, x = tiny(layers=3), ids(0)
    gm = fxfuse.optimize(model, (x,), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[ids(1)]))
    stats = fxfuse.export_onnx(gm, (x,), tmp_path / "tied.onnx", baseline=model)
    saved = stats.baseline.initializer_bytes - stats.model.initializer_bytes
    assert abs(saved - 4 * 2 * ff_params(model, 0)) <= 64  # two FFs of float32, ± a few shape constants


def test_several_windows_in_one_run_and_window_rows():
    model = tiny(layers=6)
    calls = []

    def val_loss(m):
        calls.append(1)
        with torch.no_grad():
            logits = m(ids(5))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids(5).flatten()).item()

    gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(remove=2, window=2, calibration=[ids(1)], evaluate=val_loss))
    report = fxfuse.report_of(gm)
    tied = [r for r in report.applied if r.pass_name == "tie"]
    assert len(calls) == len(report.scored) == 5  # windows (0,1) ... (4,5), scored once each
    chosen = sorted(report.scored, key=lambda r: r.score)
    assert tied[0].where == chosen[0].where and not set(tied[0].where) & set(tied[1].where)
    assert report.params_before - report.params_after == 2 * ff_params(model, 0)
    assert all(r.error is not None and r.error > 0 for r in tied)
    assert [(r.params_before, r.params_after) for r in tied] == [(2 * ff_params(model, 0), ff_params(model, 0))] * 2
    assert report.tie_error is not None and report.tie_error > 0


def test_skipped_candidates_and_fusion_modes():
    model = tiny(layers=4)
    model.blocks[3].ff = type(model.blocks[0].ff)(64, 128)
    model.eval()
    for fuse in ("mean", "freeze", "mix", "drop"):
        gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(remove=2, fuse=fuse, select="kl", calibration=[ids(1)]))
        report = fxfuse.report_of(gm)
        assert [r.where for r in report.skipped] == [["blocks.3.ff"]]
        assert "fewer than the window" in report.skipped[0].reason
        assert report.params_before - report.params_after == 2 * ff_params(model, 0)
    with torch.no_grad():
        gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(windows=[(1, 2)], fuse="freeze", calibration=[ids(1)]))
        shared = next(m for n, m in gm.named_children() if n.startswith("tied_ff"))
        weights = [p for p in shared.parameters() if p.shape == (256, 64)]
        assert any(torch.equal(w, model.blocks[1].ff.fc1.weight) for w in weights)  # nearest the middle, anchor


def test_anchor_choice_keeps_that_ff_in_place():
    model = permuted_copies("gelu", dtype=torch.float32)
    for anchor, index in (("first", 0), ("middle", 2), ("last", 3)):
        gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(windows=[(0, 1, 2, 3)], anchor=anchor,
                                                              calibration=[ids(s) for s in range(3)]))
        shared = next(m for n, m in gm.named_children() if n.startswith("tied_ff"))
        fc1 = [p for p in shared.parameters() if p.shape == (256, 64)][0]
        assert torch.allclose(fc1, model.blocks[index].ff.fc1.weight, atol=1e-6)


def test_padding_mask_leaves_padding_out_of_the_features():
    from fxfuse.tie import collect_features

    gm = fx.symbolic_trace(tiny(layers=2, dtype=torch.float64))
    ffs = find_feedforwards(gm)
    padded = ids(0, length=20)
    padded[:, 12:] = 0
    mask = torch.zeros_like(padded, dtype=torch.bool)
    mask[:, :12] = True
    with_mask, _ = collect_features(gm, ffs, [(padded,)], {0: {1}}, mask=lambda b: mask)
    clean, _ = collect_features(gm, ffs, [(padded[:, :12],)], {0: {1}})  # causal: positions < 12 are unchanged
    assert with_mask[0].n == clean[0].n == 4 * 12
    assert torch.allclose(with_mask[0].cross[1], clean[0].cross[1], rtol=1e-8)


def test_tied_model_trains_with_summed_gradients():
    model = tiny(layers=3, dtype=torch.float64)
    gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[ids(1)]))
    untied = copy.deepcopy(gm)  # same weights; FF sites re-pointed to three independent copies
    shared_name = next(n for n, _ in untied.named_children() if n.startswith("tied_ff"))
    sites = [n for n in untied.graph.nodes if n.op == "call_module" and n.target == shared_name]
    for k, node in enumerate(sites):
        untied.add_submodule(f"copy{k}", copy.deepcopy(untied.get_submodule(shared_name)))
        node.target = f"copy{k}"
    untied.recompile()
    x, target = ids(2), ids(3)
    for m in (gm, untied):
        nn.functional.cross_entropy(m(x).flatten(0, 1), target.flatten()).backward()
    for (name, p) in gm.get_submodule(shared_name).named_parameters():
        summed = sum(untied.get_submodule(f"copy{k}").get_parameter(name).grad for k in range(3))
        assert p.grad is not None and torch.allclose(p.grad, summed, rtol=1e-9, atol=1e-12)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    data = [ids(s, batch=8, length=17) % 7 for s in range(4)]
    losses = fxfuse.finetune(gm, data, loss_fn, steps=30, lr=3e-3, progress=False)
    assert losses[-1] < losses[0] - 0.5 and not gm.training


def test_cka_matrix_and_heatmap(tmp_path):
    gm = fx.symbolic_trace(permuted_copies("relu", dtype=torch.float32))
    matrix, names = fxfuse.feedforward_cka(gm, [(ids(s),) for s in range(2)])
    assert names == [f"blocks.{i}.ff" for i in range(4)] and matrix.shape == (4, 4)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    assert ((matrix >= 0) & (matrix <= 1 + 1e-9)).all() and torch.allclose(matrix, matrix.T)
    fxfuse.save_heatmap(matrix, names, tmp_path / "cka.png")
    assert (tmp_path / "cka.png").stat().st_size > 1000


@pytest.mark.parametrize("options, message", [
    (dict(align="sorted"), "align"), (dict(fuse="median"), "fuse"), (dict(anchor="end"), "anchor"),
    (dict(remove=3, window=3), "divide"), (dict(select="evaluate"), "evaluate="), (dict(select="jsd"), "select"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(fxfuse.InputError, match=message):
        fxfuse.optimize(tiny(layers=4), (ids(0),), tie=fxfuse.Tie(**options))


def test_explicit_window_of_unlike_ffs_is_an_input_error():
    model = tiny(layers=3)
    model.blocks[2].ff = type(model.blocks[0].ff)(64, 128)
    with pytest.raises(fxfuse.InputError, match="structurally identical"):
        fxfuse.optimize(model.eval(), (ids(0),), tie=fxfuse.Tie(windows=[(1, 2)]))
    with pytest.raises(fxfuse.InputError, match="blocks.0.ff"):
        fxfuse.optimize(model.eval(), (ids(0),), tie=fxfuse.Tie(windows=[(0, 7)]))


def test_overlapping_or_repeating_windows_are_an_input_error():
    for windows in ([(0, 1), (1, 2)], [(0, 0)]):
        with pytest.raises(fxfuse.InputError, match="disjoint windows"):
            fxfuse.optimize(tiny(layers=3), (ids(0),), tie=fxfuse.Tie(windows=windows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_permuted_copies_are_tied(dtype):
    """The alignment check allows the dtype's rounding (a permuted FF sums in another order)."""
    model = permuted_copies("relu").to(dtype)
    gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(windows=[(0, 1, 2, 3)], calibration=[ids(1)]))
    assert len([r for r in fxfuse.report_of(gm).applied if r.pass_name == "tie"]) == 1
    with torch.no_grad():
        assert max_rel_error(gm(ids(2)), model(ids(2))) <= 4 * torch.finfo(dtype).eps


def test_activation_settings_split_groups():
    model = tiny(layers=2, act="relu")
    model.blocks[0].ff.act, model.blocks[1].ff.act = nn.LeakyReLU(0.01), nn.LeakyReLU(5.0)
    ffs = find_feedforwards(fxfuse.optimize(model, (ids(0),)))
    assert len(group_feedforwards(ffs)) == 2


def test_cka_of_a_model_without_feedforwards_is_an_input_error():
    with pytest.raises(fxfuse.InputError, match="no feed-forward"):
        fxfuse.feedforward_cka(nn.Sequential(nn.Linear(4, 4)).eval(), [torch.randn(2, 4)])


def test_tie_without_any_data_is_an_input_error():
    with pytest.raises(fxfuse.InputError, match="calibration"):
        fxfuse.optimize(tiny(layers=4), None, tie=fxfuse.Tie(remove=1))


def test_fewer_windows_than_asked_is_reported():
    gm = fxfuse.optimize(tiny(layers=4), (ids(0),), tie=fxfuse.Tie(remove=4, window=3, select="cosine",
                                                                   calibration=[ids(1)]))
    report = fxfuse.report_of(gm)
    assert len([r for r in report.applied if r.pass_name == "tie"]) == 1
    assert any("1 non-overlapping window(s) of 3 FFs fit, 2 asked for" in r.reason for r in report.skipped)


def test_alignment_check_refuses_a_permutation_that_changes_the_function():
    from fxfuse.tie import Plan, alignment_problem, collect_features

    gm = fx.symbolic_trace(tiny(layers=2))
    ffs = find_feedforwards(gm)
    _, samples = collect_features(gm, ffs, [(ids(1),)], {})
    good = Plan((0, 1), {i: ff.weights() for i, ff in enumerate(ffs)}, None)
    assert alignment_problem(gm, ffs, good, samples) is None
    broken = ffs[1].weights()
    broken.ups[0] = (broken.ups[0][0][torch.randperm(256)], broken.ups[0][1])  # rows moved, columns not
    reason = alignment_problem(gm, ffs, Plan((0, 1), {0: ffs[0].weights(), 1: broken}, None), samples)
    assert reason is not None and "blocks.1.ff" in reason


@pytest.mark.parametrize("measure", ["cosine", "kl", "bures"])
def test_data_free_ranking_finds_the_ffs_that_are_permutations_of_each_other(measure):
    model = permuted_copies("gelu", layers=6, dtype=torch.float32)  # FFs 0-3 alike, 4 and 5 not
    gm = fxfuse.optimize(model, (ids(0),), tie=fxfuse.Tie(remove=2, select=measure, calibration=[ids(1)]))
    report = fxfuse.report_of(gm)
    scores = {tuple(r.where): r.score for r in report.scored}
    alike = [s for w, s in scores.items() if set(w) <= {f"blocks.{i}.ff" for i in range(4)}]
    others = [s for w, s in scores.items() if not set(w) <= {f"blocks.{i}.ff" for i in range(4)}]
    assert max(alike) < 1e-4 < min(others)
    chosen = [r for r in report.applied if r.pass_name == "tie"][0]
    assert set(chosen.where) <= {f"blocks.{i}.ff" for i in range(4)} and chosen.error < 1e-5
    x = ids(5)  # the tied graph itself computes the model's function (the merged FFs were permutations)
    assert_same_function(gm, model, (x,), rtol=1e-5)
