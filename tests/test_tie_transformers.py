"""Tie on Hugging Face models (transformers 5) built from small configs (random weights, nothing
downloaded), captured by torch.export (``optimize(model, inputs, passes=[])``: the graph, nothing rewritten)."""
import io

import pytest
import torch

import fxfuse
from fxfuse.alignment import permute
from fxfuse.feedforward import extract, find_feedforwards, find_in_extracted

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def each_capture():
    """symbolic_trace cannot trace transformers 5 models: these tests capture by torch.export only."""
    return "export"


def exported(model, example):
    return fxfuse.optimize(model, (example,), passes=[], capture="export")


def randomize_biases(model):
    """Random init leaves biases at zero; equal zero tensors would let ONNX's value dedup hide what tie shares."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def gpt2(layers=6):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = randomize_biases(transformers.GPT2LMHeadModel(config)).eval()
    return model, exported(model, tokens(0))


def vit(layers=6):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=384, image_size=16, patch_size=8, num_labels=5)
    model = randomize_biases(transformers.ViTForImageClassification(config)).eval()
    return model, exported(model, pixels(0))


def ff_numel(ff):
    """Parameters of one FF's layers, from the detected roles."""
    return sum(t.numel() for d in ff.ups + [ff.down] for t in (d.weight, d.bias) if t is not None)


def tokens(seed):
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))


def pixels(seed):
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ff_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def checkpoint_bytes(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def test_gpt2_conv1d_ffs_are_found_and_permuted_on_the_right_axis():
    model, traced = gpt2(layers=2)
    ffs = find_feedforwards(traced)
    assert [ff.name for ff in ffs] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert all(d.transposed for ff in ffs for d in ff.ups + [ff.down])  # Conv1D stores (in, out)
    module = extract(traced.double(), ffs[0])
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ref = module(x)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    find_in_extracted(module).load(permute(ffs[0].weights(), perm))
    assert ((module(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("build, inputs", [(gpt2, tokens), (vit, pixels)], ids=["gpt2", "vit"])
def test_hf_models_tie_two_of_six_ffs_and_the_checkpoint_shrinks(build, inputs):
    model, traced = build()
    ffs = find_feedforwards(traced)
    assert len(ffs) == 6
    gm = fxfuse.optimize(traced, (inputs(0),), tie=fxfuse.Tie(remove=2, calibration=[inputs(s) for s in range(1, 4)]))
    report = fxfuse.report_of(gm)
    one_ff = ff_numel(ffs[1])
    assert report.params_before - report.params_after == 2 * one_ff
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters()) - 2 * one_ff
    saved = checkpoint_bytes(traced) - checkpoint_bytes(gm)
    assert 2 * one_ff * 4 <= saved <= 2 * one_ff * 4 + 8 * 512  # the tensors, + ≤ 512 B of zip record per tensor
    with torch.no_grad():
        out = gm(inputs(5))
    assert torch.isfinite(torch.utils._pytree.tree_leaves(out)[0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("build, inputs", [(gpt2, tokens), (vit, pixels)], ids=["gpt2", "vit"])
def test_hf_models_onnx_file_shrinks_by_the_tied_bytes(build, inputs, tmp_path):
    """The dynamo exporter's constant folding (onnxscript, inputs ≤ 8192 elements) turns a small
    Linear weight's Transpose into one folded copy per call site, which would undo the sharing in
    the file; ViT's FF weights here are 32×384, above that limit (GPT-2's Conv1D needs no transpose)."""
    model, traced = build(layers=3)
    ffs = find_feedforwards(traced)
    gm = fxfuse.optimize(traced, (inputs(0),), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[inputs(1)]))
    removed = 2 * 4 * ff_numel(ffs[1])
    stats = fxfuse.export_onnx(gm, (inputs(0),), tmp_path / "tied.onnx", baseline=traced)
    assert abs(stats.baseline.initializer_bytes - stats.model.initializer_bytes - removed) <= 64
    assert stats.baseline.file_bytes - stats.model.file_bytes >= removed - 1024


def test_tied_gpt2_trains():
    _, traced = gpt2(layers=3)
    gm = fxfuse.optimize(traced, (tokens(0),), tie=fxfuse.Tie(windows=[(0, 1, 2)], calibration=[tokens(1)]))
    shared = [m for n, m in gm.named_children() if n.startswith("tied_ff")][0]

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])["logits"]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    before = [p.detach().clone() for p in shared.parameters()]
    losses = fxfuse.finetune(gm, [tokens(s) % 5 for s in range(4)], loss_fn, steps=20, lr=3e-3, progress=False)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, shared.parameters()))
