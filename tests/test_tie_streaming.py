"""The lean tie path (what lets a Llama-2-7B-shaped model be tied within 1.3x its bytes,
benchmarks/tie_7b.py): row-chunked correlations, the assignment on -C in place, aligned members in
their own dtype, fxfuse.tie(inplace=True). Oracle: the float64 whole-matrix computation the tie
used before, written out here; everything must agree bit for bit (torch.equal)."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.alignment import CHUNK_ROWS, FeatureStats, average, cross_correlation, match_permutation, permute
from fxfuse.capture import capture
from fxfuse.feedforward import find_feedforwards
from fxfuse.tie import Tie, collect_features, plan_window

transformers = pytest.importorskip("transformers")

V = 50


@pytest.fixture(autouse=True)
def each_capture():
    """transformers 5 models are captured by torch.export only (as in test_module_tie.py)."""
    return "export"


def llama(dtype, layers=3):
    """A tiny LlamaForCausalLM (random weights, norms nudged off one), layer 1 a permutation of layer 0."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, vocab_size=V,
                                      max_position_embeddings=64, pad_token_id=0, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
        src, dst = model.model.layers[0].mlp, model.model.layers[1].mlp
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        dst.gate_proj.weight.copy_(src.gate_proj.weight[perm] + 0.01 * torch.randn_like(src.gate_proj.weight))
        dst.up_proj.weight.copy_(src.up_proj.weight[perm])
        dst.down_proj.weight.copy_(src.down_proj.weight[:, perm])
    return model.to(dtype)


def batches():
    return [{"input_ids": torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(s))} for s in (1, 2)]


def whole_matrix_correlation(a: FeatureStats, b: FeatureStats, cross_ab: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as the tie formed it before: every H×H temporary at once."""
    mean_a, std_a = a.mean_std()
    mean_b, std_b = b.mean_std()
    cov = cross_ab / a.n - torch.outer(mean_a, mean_b)
    scale = torch.outer(std_a, std_b)
    alive = scale > 1e-12 * max(scale.max().item(), 1e-300)
    return torch.where(alive, cov / torch.where(alive, scale, torch.ones_like(scale)), torch.zeros_like(cov))


def random_stats(hidden=CHUNK_ROWS * 2 + 77, rows=300):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g) * 3 + 1
    a[:, :5] = 0.0  # dead neurons: σ = 0
    sa, sb = FeatureStats(), FeatureStats()
    sa.add(a)
    sb.add(b)
    sa.add_cross(1, a, b)
    return sa, sb


def test_row_chunked_correlation_has_the_whole_matrix_bits_also_written_over_its_sums():
    sa, sb = random_stats()
    reference = whole_matrix_correlation(sa, sb, sa.cross[1])
    assert torch.equal(cross_correlation(sa, sb, sa.cross[1]), reference)
    cross = sa.cross[1].clone()
    assert cross_correlation(sa, sb, cross, out=cross) is cross and torch.equal(cross, reference)
    assert torch.equal(reference[:5], torch.zeros_like(reference[:5]))


def test_assignment_on_negated_correlation_in_place_finds_the_same_permutation():
    sa, sb = random_stats(hidden=400)
    corr = cross_correlation(sa, sb, sa.cross[1])
    expected = match_permutation(corr)
    negated = corr.clone()
    assert torch.equal(match_permutation(negated, overwrite=True), expected)
    assert torch.equal(negated, -corr)  # documented: −C is left in it


def old_plan(ffs, window, stats):
    """The tie's plan before: float64 copies of every member, permuted, then averaged (anchor first)."""
    a = window[0]
    aligned = {}
    for i in window:
        w = ffs[i].weights()
        if i != a:
            w = permute(w, match_permutation(whole_matrix_correlation(stats[a], stats[i], stats[a].cross[i])))
        aligned[i] = w
    return aligned, average([aligned[i] for i in window])


def assert_same_weights(new, old):
    pairs = list(zip(new.ups, old.ups)) + [(new.down, old.down)]
    for (w_new, b_new), (w_old, b_old) in pairs:
        assert torch.equal(w_new.double(), w_old)
        assert (b_new is None) == (b_old is None) and (b_new is None or torch.equal(b_new.double(), b_old))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_gives_the_old_float64_permutations_and_merged_weights(dtype):
    model = llama(dtype).eval()
    gm = capture(model, fxfuse.inputs.as_inputs(batches()[0]), method="export")
    ffs = find_feedforwards(gm)
    window = (0, 1, 2)
    stats, _ = collect_features(gm, ffs, batches(), {0: {1, 2}}, members=set(window))
    old_aligned, old_merged = old_plan(ffs, window, copy.deepcopy(stats))
    plan = plan_window(Tie(remove=2), ffs, window, stats)
    assert not stats[0].cross  # the cross sums were consumed
    assert plan.merged.ups[0][0].dtype == torch.float64 and plan.aligned[1].ups[0][0].dtype == dtype
    assert_same_weights(plan.merged, old_merged)
    for i in window:
        assert_same_weights(plan.aligned[i], old_aligned[i])
    assert not torch.equal(plan.aligned[1].ups[0][0], ffs[1].weights(None).ups[0][0])  # a real permutation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{"remove": 1, "select": "euclidean"}, {"windows": [(0, 1)]}])
def test_inplace_tie_ties_the_model_itself_as_the_copying_tie_ties_a_copy(dtype, options):
    model = llama(dtype)  # as from_config: training mode
    copied = fxfuse.tie(model, batches(), **options)
    original = copy.deepcopy(model)
    tied = fxfuse.tie(model, batches(), inplace=True, **options)
    assert tied is model and tied.training
    assert tied.config.fxfuse_ties == copied.config.fxfuse_ties and len(tied.config.fxfuse_ties) == 1
    (member, shared), = tied.config.fxfuse_ties.items()
    assert tied.get_submodule(member) is tied.get_submodule(shared)
    assert tied.state_dict().keys() == copied.state_dict().keys()
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in tied.state_dict().items())
    assert not torch.equal(tied.get_submodule(shared).gate_proj.weight, original.get_submodule(shared).gate_proj.weight)
    rows, copied_rows = fxfuse.report_of(tied).rows, fxfuse.report_of(copied).rows
    assert [(r.status, r.where, r.error) for r in rows] == [(r.status, r.where, r.error) for r in copied_rows]
    assert fxfuse.report_of(tied).params_before == sum(p.numel() for p in original.parameters())
