"""fxfuse.tie: Hugging Face models (transformers 5, small configs, random weights) stay their own class,
their tied FF submodules one module object, through generate, save_pretrained/from_pretrained and
torch.save/torch.load. Oracles: the original model's own outputs and parameter counts from the config."""
import io

import pytest
import torch

import fxfuse
from fxfuse.models import TinyDecoder

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

V = 50  # vocabulary


@pytest.fixture(autouse=True)
def each_capture():
    """transformers 5 models are captured by torch.export only (the capture is a parameter where it matters)."""
    return "export"


def gpt2(layers=4):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=V, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return nudge(transformers.AutoModelForCausalLM.from_config(config))


def decoder(config_class):
    def build(layers=4):
        torch.manual_seed(0)
        config = config_class(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=64, vocab_size=V, max_position_embeddings=64, pad_token_id=0)
        return nudge(transformers.AutoModelForCausalLM.from_config(config))
    return build


llama, qwen2 = decoder(transformers.LlamaConfig), decoder(transformers.Qwen2Config)
BUILDERS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2}


def nudge(model):
    """Random init leaves biases at zero and norm scales at one: move them, so a wrong permutation shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def ff_params(config) -> int:
    """One FF sublayer's parameters, by hand: GPT-2 c_fc (d, 4d) + 4d, c_proj (4d, d) + d; SwiGLU 3·d·i."""
    if config.model_type == "gpt2":
        d = config.n_embd
        return 2 * d * 4 * d + 4 * d + d
    return 3 * config.hidden_size * config.intermediate_size


def blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def copy_permuted(model, layers):
    """Layer 0's MLP into each of ``layers`` with its hidden units shuffled: the same function, other weights."""
    g = torch.Generator().manual_seed(1)
    src = blocks(model)[0].mlp
    with torch.no_grad():
        for k in layers:
            dst = blocks(model)[k].mlp
            if hasattr(src, "c_fc"):  # Conv1D: weight stored (in, out)
                perm = torch.randperm(src.c_fc.nf, generator=g)
                dst.c_fc.weight.copy_(src.c_fc.weight[:, perm])
                dst.c_fc.bias.copy_(src.c_fc.bias[perm])
                dst.c_proj.weight.copy_(src.c_proj.weight[perm])
                dst.c_proj.bias.copy_(src.c_proj.bias)
            else:
                perm = torch.randperm(src.up_proj.out_features, generator=g)
                dst.gate_proj.weight.copy_(src.gate_proj.weight[perm])
                dst.up_proj.weight.copy_(src.up_proj.weight[perm])
                dst.down_proj.weight.copy_(src.down_proj.weight[:, perm])
    return model


def ids(seed, batch=2, seq=8):
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def calibration():
    return [{"input_ids": ids(s)} for s in range(1, 4)]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def greedy(model, prompt):
    return model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def shared_groups(model):
    """{shared path: [member paths]} from the config's record."""
    groups = {}
    for member, shared in model.config.fxfuse_ties.items():
        groups.setdefault(shared, []).append(member)
    return groups


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def permuted(request):
    """(original, tied): layers 1, 2 are exact permutations of layer 0, and the window (0, 1, 2) is tied."""
    model = copy_permuted(BUILDERS[request.param](), [1, 2]).eval()
    return model, fxfuse.tie(model, calibration(), windows=[(0, 1, 2)])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_same_class_one_shared_module_fewer_params_model_unchanged(arch):
    model = BUILDERS[arch]()  # from_config: in training mode, as users get it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def val_loss(m):
        seen.append(type(m))
        return m(input_ids=ids(9), labels=ids(9)).loss.item()

    tied = fxfuse.tie(model, calibration(), remove=2, evaluate=val_loss)
    assert type(tied) is type(model) and tied.training == model.training
    assert seen == [type(model)] * 2  # both windows of 3 among 4 FFs scored, on the user's class
    (shared, members), = shared_groups(tied).items()
    assert len(members) == 2 and all(tied.get_submodule(m) is tied.get_submodule(shared) for m in members)
    assert n_params(tied) == n_params(model) - 2 * ff_params(model.config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not hasattr(model.config, "fxfuse_ties")
    assert len({id(b.mlp) for b in blocks(model)}) == len(blocks(model))
    assert greedy(tied, ids(7, batch=1, seq=5)).shape == (1, 25)
    assert fxfuse.report_of(tied).params_after == n_params(tied)


def test_exact_permutations_generate_the_same_tokens(permuted):
    model, tied = permuted
    assert len({id(b.mlp) for b in blocks(tied)}) == len(blocks(tied)) - 2
    x = ids(11)
    ref = logits(model, x)
    assert ((logits(tied, x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    prompt = ids(12, batch=1, seq=5)
    assert torch.equal(greedy(tied, prompt), greedy(model, prompt))


def test_save_pretrained_and_from_pretrained_keep_one_copy(permuted, tmp_path):
    model, tied = permuted
    tied.save_pretrained(tmp_path / "tied")
    model.save_pretrained(tmp_path / "original")
    one_ff = ff_params(model.config)
    with safetensors.safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert not any(k.startswith(m + ".") for k in stored for m in tied.config.fxfuse_ties)
    assert sum(torch.Size(s).numel() for s in stored.values()) == n_params(tied)
    saved = (tmp_path / "original" / "model.safetensors").stat().st_size - (
        tmp_path / "tied" / "model.safetensors").stat().st_size
    assert 2 * one_ff * 4 <= saved <= 2 * one_ff * 4 + 2048  # the tensors, + their header entries

    again = fxfuse.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "tied")
    assert type(again) is type(model) and n_params(again) == n_params(model) - 2 * one_ff
    assert all(again.get_submodule(m) is again.get_submodule(s) for m, s in again.config.fxfuse_ties.items())
    x = ids(13)
    assert torch.equal(logits(again, x), logits(tied, x))
    again.save_pretrained(tmp_path / "again")  # the reloaded model saves one copy too
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == (
        tmp_path / "tied" / "model.safetensors").stat().st_size


def test_plain_from_pretrained_reports_the_shared_weights_missing(permuted, tmp_path):
    """Why fxfuse.from_pretrained exists: transformers' own loader cannot re-tie (module docstring)."""
    _, tied = permuted
    tied.save_pretrained(tmp_path)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    members = {f"{m}.{k}" for m, s in tied.config.fxfuse_ties.items() for k in tied.get_submodule(s).state_dict()}
    assert set(info["missing_keys"]) == members


def test_torch_save_and_load_keep_the_ties(permuted):
    model, tied = permuted
    buffer = io.BytesIO()
    torch.save(tied, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert type(back) is type(model) and n_params(back) == n_params(tied)
    assert all(back.get_submodule(m) is back.get_submodule(s) for m, s in back.config.fxfuse_ties.items())
    x = ids(14)
    assert torch.equal(logits(back, x), logits(tied, x))


def bert(layers=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=V, max_position_embeddings=32, num_labels=3)
    return nudge(transformers.BertForSequenceClassification(config)).eval()


def vit(layers=3):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=8, num_labels=3)
    return nudge(transformers.ViTForImageClassification(config)).eval()


def encoder_batches(arch):
    if arch == "bert":
        return [{"input_ids": ids(s), "attention_mask": torch.ones(2, 8, dtype=torch.long)} for s in range(1, 4)]
    return [{"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(s))} for s in range(3)]


def up_down(model, k):
    """Layer k's FF Linears: BERT's intermediate.dense and output.dense, ViT's (transformers 5) mlp.fc1 and fc2."""
    if hasattr(model, "bert"):
        layer = model.bert.encoder.layer[k]
        return layer.intermediate.dense, layer.output.dense
    return model.vit.layers[k].mlp.fc1, model.vit.layers[k].mlp.fc2


def copy_permuted_encoder(model, layers):
    """Layer 0's FF into ``layers`` with its hidden units shuffled."""
    g = torch.Generator().manual_seed(1)
    up0, down0 = up_down(model, 0)
    with torch.no_grad():
        for k in layers:
            up, down = up_down(model, k)
            perm = torch.randperm(up0.out_features, generator=g)
            up.weight.copy_(up0.weight[perm])
            up.bias.copy_(up0.bias[perm])
            down.weight.copy_(down0.weight[:, perm])
            down.bias.copy_(down0.bias)
    return model


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_an_ff_spread_over_two_submodules_shares_its_two_dense_modules(arch, tmp_path):
    """BERT's FF is intermediate.dense → GELU → output.dense, and output also adds the residual and
    normalises: the two Linear modules are shared, the rest of each layer stays its own. (ViT's FF is
    one module in transformers 5, vit.layers.k.mlp: shared whole.)"""
    model = copy_permuted_encoder({"bert": bert, "vit": vit}[arch](), [1])
    batches = encoder_batches(arch)
    tied = fxfuse.tie(model, batches, windows=[(0, 1)])
    assert type(tied) is type(model)
    assert up_down(tied, 1) == up_down(tied, 0) and up_down(tied, 2)[1] is not up_down(tied, 0)[1]
    assert len({id(m) for m in tied.modules() if isinstance(m, torch.nn.LayerNorm)}) == len(
        [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)])
    d, i = model.config.hidden_size, model.config.intermediate_size
    assert n_params(tied) == n_params(model) - (2 * d * i + i + d)
    with torch.no_grad():
        ref, out = model(**batches[0]).logits, tied(**batches[0]).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5  # exact permutations: the same function
    tied.save_pretrained(tmp_path)
    again = fxfuse.from_pretrained(type(model), tmp_path)
    assert up_down(again, 1) == up_down(again, 0)
    buffer = io.BytesIO()
    torch.save(tied, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert up_down(back, 1) == up_down(back, 0)
    with torch.no_grad():
        for loaded in (again, back):
            assert torch.equal(loaded.eval()(**batches[1]).logits, tied(**batches[1]).logits)


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_plain_torch_model_on_either_capture(capture):
    model = TinyDecoder(layers=3, hidden=64).eval()
    tied = fxfuse.tie(model, iter([ids(s) for s in range(3)]), remove=1, capture=capture)  # a generator: read once
    assert type(tied) is TinyDecoder
    assert n_params(tied) == n_params(model) - (2 * 64 * 64 + 64 + 64)  # dim 64, hidden 64, with biases
    assert sum(a.ff is b.ff for a, b in zip(tied.blocks, tied.blocks[1:])) == 1
    assert torch.isfinite(tied(ids(5))).all()


def test_drop_is_refused():
    with pytest.raises(fxfuse.InputError, match="fuse='drop'"):
        fxfuse.tie(TinyDecoder(layers=2).eval(), [ids(1)], fuse="drop")


class Residual(torch.nn.Module):
    """A block computing its FF with functional layers on its own parameters: no submodule to share."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.w1, self.w2 = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        f = torch.nn.functional
        return x + f.linear(f.gelu(f.linear(self.norm(x), self.w1)), self.w2)


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_an_ff_inside_a_larger_module_is_refused_on_either_capture(capture):
    model = torch.nn.Sequential(Residual(), Residual()).eval()
    with pytest.raises(fxfuse.UnsupportedModelError, match=r"only part of 0 \(Residual\), which also computes"):
        fxfuse.tie(model, [torch.randn(2, 4, 16)], capture=capture)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "bert", "vit"])
def test_the_trainer_steps_a_tied_model_of_each_class_and_keeps_the_ties(arch, tmp_path):
    """(LlamaForCausalLM: tests/test_tied_training.py, with the summed gradient and LoRA.)"""
    model = {"gpt2": gpt2, "qwen2": qwen2, "bert": bert, "vit": vit}[arch]()
    batches = calibration() if arch in BUILDERS else encoder_batches(arch)
    tied = fxfuse.tie(model, batches, windows=[(0, 1)])
    ties = dict(tied.config.fxfuse_ties)
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
    data = [{**r, "labels": r["input_ids"] if arch in BUILDERS else torch.tensor(i % 3)} for i, r in enumerate(rows)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no")
    transformers.Trainer(model=tied, args=args, train_dataset=data).train()
    assert type(tied) is type(model) and all(tied.get_submodule(m) is tied.get_submodule(s) for m, s in ties.items())
    shared = set(ties.values())
    assert any(not torch.equal(v, before[k]) for k, v in tied.state_dict().items()
               if any(k.startswith(s + ".") for s in shared))  # the shared weights train
