"""What a rewrite must preserve: dtype, device, requires_grad, buffers, shared weights, hooks, names."""
import copy

import pytest
import torch
from conftest import optimize_and_compare, randomize_batchnorm
from torch import nn

import fxfuse
from fxfuse.models import demo_inputs, demo_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_rewritten_and_stay_half(dtype):
    model = demo_model().to(dtype)
    inputs = tuple(x.to(dtype) for x in demo_inputs())
    gm = fxfuse.optimize(model, inputs)
    report = fxfuse.report_of(gm)
    assert len(report.applied) == 4 and all(p.dtype == dtype for p in gm.parameters())
    assert sorted(r.pass_name for r in report.applied) == ["collapse", "compose", "fold_batchnorm", "fold_batchnorm"]
    eps = torch.finfo(dtype).eps
    assert all(r.error <= 2 * eps for r in report.applied) and report.error <= 2 * eps
    assert_as_close_to_truth_as_the_original(gm, model, demo_model(), inputs)


def assert_as_close_to_truth_as_the_original(gm, model, full_precision_model, inputs):
    """The rewritten half model is about as far from float64 truth (``full_precision_model`` in
    float64) as the original half model."""
    with torch.no_grad():
        reference = copy.deepcopy(full_precision_model).double()(*(x.double() for x in inputs))
        optimized, original = gm(*inputs).double(), model(*inputs).double()
    scale, eps = reference.abs().max(), torch.finfo(inputs[0].dtype).eps
    assert (optimized - reference).abs().max() / scale <= 2 * ((original - reference).abs().max() / scale) + eps


class TiedHead(nn.Module):
    """An embedding and an output Linear sharing one weight, with a collapsible MLP between."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.PReLU(init=1.0), nn.Linear(64, 16)
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.register_buffer("position", torch.arange(7.0)[:, None])

    def forward(self, tokens):
        h = self.embed(tokens) + self.position  # sequences of 7 tokens
        return self.head(self.norm(self.fc2(self.act(self.fc1(h)))))


def test_shared_weights_stay_shared_and_buffers_stay():
    model = TiedHead().eval()
    gm, report = optimize_and_compare(model, (torch.randint(0, 50, (2, 7)),))
    assert gm.head.weight is gm.embed.weight
    assert report.params_after == 50 * 16 + 16 * 16 + 16
    assert torch.equal(gm.position, model.position)


def test_requires_grad_flags_are_kept():
    model = nn.Sequential(nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8), nn.LayerNorm(8)).eval()
    model[0].requires_grad_(False)
    model[3].requires_grad_(False)
    gm, _ = optimize_and_compare(model, (torch.randn(3, 8),))
    assert not any(p.requires_grad for p in gm.parameters())


def test_hooks_keep_running_and_block_the_rewrite_of_their_module():
    model = nn.Sequential(nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8), nn.LayerNorm(8)).eval()
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append("norm"))
    model[0].register_forward_hook(lambda m, i, o: seen.append("fc1"))
    for inputs in ((torch.randn(2, 8),), None):
        gm = fxfuse.optimize(model, inputs)
        seen.clear()
        gm(torch.randn(2, 8))
        assert seen == ["fc1", "norm"]
        report = fxfuse.report_of(gm)
        assert not report.applied and "0 has hooks" in report.skipped[0].reason


def test_report_names_modules_by_their_paths_in_the_users_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8))

        def forward(self, x):
            return x + self.mlp(x)

    model = nn.Sequential(Block(), Block()).eval()
    gm = fxfuse.optimize(model, (torch.randn(2, 8),))
    assert [r.where for r in fxfuse.report_of(gm).applied] == [
        ["0.mlp.0", "0.mlp.1", "0.mlp.2"], ["1.mlp.0", "1.mlp.1", "1.mlp.2"]]


def test_saved_and_loaded_optimized_module_reproduces_its_outputs(tmp_path):
    model, inputs = demo_model(), demo_inputs()
    gm = fxfuse.optimize(model, inputs)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert torch.equal(loaded(*inputs), gm(*inputs))
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    assert sum(p.numel() for p in loaded.parameters()) == fxfuse.report_of(gm).params_after
    assert fxfuse.report_of(loaded).to_json() == fxfuse.report_of(gm).to_json()


def test_report_of_a_module_fxfuse_did_not_make():
    with pytest.raises(fxfuse.InputError, match="no fxfuse report"):
        fxfuse.report_of(torch.fx.symbolic_trace(demo_model()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_model_stays_on_cuda():
    full = randomize_batchnorm(demo_model()).to("cuda")
    model = copy.deepcopy(full).to(torch.bfloat16)
    inputs = tuple(x.to("cuda", torch.bfloat16) for x in demo_inputs())
    gm = fxfuse.optimize(model, inputs)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in gm.parameters())
    assert len(fxfuse.report_of(gm).applied) == 4
    assert gm(*inputs).device.type == "cuda"
    assert fxfuse.report_of(gm).error <= 2 * torch.finfo(torch.bfloat16).eps
    fresh = tuple(torch.randn_like(x) for x in inputs)
    assert_as_close_to_truth_as_the_original(gm, model, full, fresh)
