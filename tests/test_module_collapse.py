"""Module-level LayerCollapse: prepare_collapse and collapse return the user's own class (transformers 5
GPT-2, BERT, ViT; plain torch), through generate, save_pretrained / fxfuse.from_pretrained, torch.save /
torch.load and a Trainer step. Oracles: the prepared model's own outputs (a PReLU of slope 1 is the
identity, so collapsing it changes nothing) and parameter counts from the configs, by hand."""
import io

import pytest
import torch
from torch import nn

import fxfuse

transformers = pytest.importorskip("transformers")
from hf_models import HF_MODELS  # noqa: E402  (needs transformers)


@pytest.fixture(autouse=True)
def each_capture():
    """transformers 5 models are captured by torch.export; the capture is a parameter where it matters."""
    return "export"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model, kwargs):
    with torch.no_grad():
        out = model.eval()(**kwargs)
    return out.logits


def sizes(config) -> tuple[int, int, int]:
    """(hidden, FF width, layers) from a config, by hand."""
    if config.model_type == "gpt2":
        return config.n_embd, 4 * config.n_embd, config.n_layer
    return config.hidden_size, config.intermediate_size, config.num_hidden_layers


@pytest.fixture(scope="module", params=["gpt2", "bert", "vit"])
def collapsed(request):
    """(original, prepared with every slope set to 1, collapsed, example kwargs, make_kwargs)."""
    model, kwargs, make = HF_MODELS[request.param]()
    prepared = fxfuse.prepare_collapse(model, kwargs)
    with torch.no_grad():
        for slope in fxfuse.slopes(prepared):
            slope.fill_(1.0)
    return model, prepared, fxfuse.collapse(prepared, kwargs), kwargs, make


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_prepare_keeps_the_class_swaps_each_ff_activation_for_a_prelu_and_leaves_the_model(name):
    model, kwargs, _ = HF_MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = fxfuse.prepare_collapse(model, kwargs, which=0.5)
    hidden, width, layers = sizes(model.config)
    assert type(prepared) is type(model)
    (pair,) = fxfuse.collapse_pairs(prepared)  # the last of the `layers` FFs: which=0.5 of 2
    assert type(prepared.get_submodule(pair.slope)) is nn.PReLU and str(layers - 1) in pair.slope
    assert fxfuse.slopes(prepared)[0].item() == 0.0  # GELU → ReLU → PReLU(0), LayerCollapse Sec. 4.2
    assert pair.gain == pytest.approx(1 - hidden * hidden / (width * 2 * hidden))  # Eq. 7
    assert n_params(prepared) == n_params(model) + 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, nn.PReLU) for m in model.modules())


def test_collapse_keeps_the_class_and_the_function_with_fewer_parameters(collapsed):
    model, prepared, small, kwargs, make = collapsed
    hidden, width, layers = sizes(model.config)
    assert type(small) is type(model)
    ff, one = 2 * hidden * width + width + hidden, hidden * hidden + hidden  # two layers + biases → one Linear
    assert n_params(small) == n_params(model) - layers * (ff - one)
    assert fxfuse.report_of(small).params_after == n_params(small)
    for fresh in (kwargs, make(3, 11, seed=5)):
        ref = outputs(prepared, fresh)
        assert ((outputs(small, fresh) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    rows = [r for r in fxfuse.report_of(small).rows if r.status == "applied"]
    assert len(rows) == layers and all(r.exact and r.error <= 1e-5 for r in rows)


def test_collapsed_gpt2_generates_the_prepared_models_tokens():
    model, kwargs, _ = HF_MODELS["gpt2"]()
    prepared = fxfuse.prepare_collapse(model, kwargs)
    with torch.no_grad():
        for slope in fxfuse.slopes(prepared):
            slope.fill_(1.0)
    small = fxfuse.collapse(prepared, kwargs)
    prompt = kwargs["input_ids"][:1, :5]
    greedy = lambda m: m.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,  # noqa: E731
                                         do_sample=False, pad_token_id=0)
    assert torch.equal(greedy(small), greedy(prepared))


def test_save_pretrained_and_from_pretrained_rebuild_the_collapsed_layers(collapsed, tmp_path):
    model, _, small, kwargs, _ = collapsed
    small.save_pretrained(tmp_path)
    assert all(spec["type"] in ("Identity", "Linear") for spec in small.config.fxfuse_modules.values())
    again = fxfuse.from_pretrained(type(model), tmp_path)
    assert type(again) is type(model) and n_params(again) == n_params(small)
    assert torch.equal(outputs(again, kwargs), outputs(small, kwargs))
    with pytest.raises(Exception, match="(?i)size|shape"):  # transformers' own loader builds the original layers
        type(model).from_pretrained(tmp_path)


def test_a_prepared_model_saves_and_loads_its_prelus(tmp_path):
    model, kwargs, _ = HF_MODELS["bert"]()
    prepared = fxfuse.prepare_collapse(model, kwargs)
    with torch.no_grad():
        fxfuse.slopes(prepared)[0].fill_(0.3)
    prepared.save_pretrained(tmp_path)
    again = fxfuse.from_pretrained(transformers.AutoModelForSequenceClassification, tmp_path)
    assert type(again) is type(model)
    assert fxfuse.collapse_pairs(again) == fxfuse.collapse_pairs(prepared)  # recorded in the config too
    assert [a.item() for a in fxfuse.slopes(again)] == pytest.approx([0.3, 0.0])
    assert torch.equal(outputs(again, kwargs), outputs(prepared, kwargs))


def test_torch_save_and_load_round_trip(collapsed):
    _, prepared, small, kwargs, _ = collapsed
    for module in (prepared, small):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        back = torch.load(buffer, weights_only=False)
        assert type(back) is type(module) and torch.equal(outputs(back, kwargs), outputs(module, kwargs))
    assert fxfuse.report_of(back).params_after == n_params(small)


def test_the_trainer_trains_the_prepared_slopes_and_the_collapsed_model(tmp_path):
    model, kwargs, make = HF_MODELS["bert"]()
    prepared = fxfuse.prepare_collapse(model, kwargs)
    data = [{**{k: v[i] for k, v in make(8, 8, seed=s).items()}, "labels": torch.tensor(i % 3)}
            for s in range(2) for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    transformers.Trainer(model=prepared, args=args, train_dataset=data).train()
    assert all(a.item() != 0.0 for a in fxfuse.slopes(prepared))  # the slopes receive gradients
    with torch.no_grad():
        for slope in fxfuse.slopes(prepared):
            slope.fill_(1.0)
    small = fxfuse.collapse(prepared, kwargs)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    transformers.Trainer(model=small, args=args, train_dataset=data).train()
    changed = [k for k, v in small.state_dict().items() if not torch.equal(v, before[k])]
    assert any("output.dense" in k for k in changed)  # the collapsed Linear trains


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_gated_ffs_are_refused_with_the_reason_and_the_class_stays(name):
    """SwiGLU's φ(x·Wg) ⊙ (x·Wu) is not linear even where φ is: nothing to prepare, nothing collapses."""
    model, kwargs, _ = HF_MODELS[name]()
    with pytest.raises(fxfuse.UnsupportedModelError, match="SwiGLU"):
        fxfuse.prepare_collapse(model, kwargs)
    same = fxfuse.collapse(model, kwargs)
    assert type(same) is type(model) and same is not model and n_params(same) == n_params(model)
    rows = fxfuse.report_of(same).rows
    layers = model.config.num_hidden_layers
    assert [r.status for r in rows] == ["skipped"] * layers and all("SwiGLU" in r.reason for r in rows)
    assert torch.equal(outputs(same, kwargs), outputs(model, kwargs))


def test_slopes_near_one_collapse_approximately_with_the_error_reported_and_far_ones_are_refused():
    model, kwargs, _ = HF_MODELS["vit"]()
    prepared = fxfuse.prepare_collapse(model, kwargs)
    near, far = fxfuse.slopes(prepared)
    with torch.no_grad():
        near.fill_(1 - 5e-5)
        far.fill_(0.5)
    small = fxfuse.collapse(prepared, kwargs, tau=1e-4)
    applied, skipped = ([r for r in fxfuse.report_of(small).rows if r.status == s] for s in ("applied", "skipped"))
    assert len(applied) == 1 and not applied[0].exact and 0 < applied[0].error <= 1e-2
    assert len(skipped) == 1 and "max|α−1| = 0.5 > τ" in skipped[0].reason
    assert type(small.get_submodule(skipped[0].where[1])) is nn.PReLU  # left as it was
    strict = fxfuse.collapse(prepared, kwargs, tau=1e-6)
    assert n_params(strict) == n_params(prepared) and {r.status for r in fxfuse.report_of(strict).rows} == {"skipped"}


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_plain_torch_mlp_keeps_its_class(capture):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 8)
    prepared = fxfuse.prepare_collapse(model, x)
    assert type(prepared) is nn.Sequential and type(prepared[1]) is nn.PReLU
    with torch.no_grad():
        prepared[1].weight.fill_(1.0)
    small = fxfuse.collapse(prepared, x, capture=capture)
    assert [type(m) for m in small] == [nn.Identity, nn.Identity, nn.Dropout, nn.Linear]
    assert n_params(small) == 8 * 8 + 8
    with torch.no_grad():
        assert torch.allclose(small(x), model[3](model[0](x)), atol=1e-6)  # PReLU(1), eval dropout: the identity
