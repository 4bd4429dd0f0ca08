"""A tied model (fxfuse.tie: repeated FF submodules one shared module object) trains with the usual tools:
the transformers Trainer, PEFT LoRA (the FF-merging paper's QLoRA fine-tuning, without quantization), and
save_pretrained / fxfuse.from_pretrained afterwards. Tiny Llama (small config, random weights, nothing downloaded),
trained on CPU on token ids made from Python's own stdlib source text.

Oracles: the summed gradient is checked against an untied copy (every member site its own module, cloned
weights); the rest against the model itself before training, before merging or before saving."""
import copy
import inspect
import textwrap
import warnings

import pytest
import torch

import fxfuse

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

V = 50  # vocabulary
SEQ = 16
TIED = [0, 1, 2]  # the window tied: layers 0-2 share layer 0's module, layer 3 keeps its own
SHARED, MEMBERS = "model.layers.0.mlp", ["model.layers.1.mlp", "model.layers.2.mlp"]
PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def each_capture():
    """Overrides conftest's (export, fx) parametrization: the capture does not matter once the modules are tied."""
    return "export"


def rows(n, offset=0):
    """``n`` rows of SEQ token ids: the bytes of textwrap's source, mod V."""
    data = inspect.getsource(textwrap).encode()[offset * SEQ:(offset + n) * SEQ]
    return torch.tensor(list(data), dtype=torch.long).remainder(V).view(n, SEQ)


class TextRows(torch.utils.data.Dataset):
    """A causal-LM dataset in memory: labels = input_ids (the model shifts them)."""

    def __init__(self, n=8):
        self.ids = rows(n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def blocks(model):
    return model.model.layers


def ff_ids(model):
    return [id(b.mlp) for b in blocks(model)]


def assert_tied(model):
    """Layers 0-2 one module object, layer 3 its own: the shape fxfuse.tie gave (checked in `tied`)."""
    mlp = [b.mlp for b in blocks(model)]
    assert mlp[1] is mlp[0] and mlp[2] is mlp[0] and mlp[3] is not mlp[0]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def arguments(tmp_path, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=0, **kwargs)


@pytest.fixture(scope="module")
def tied():
    """(untied original, tied copy): a 4-layer tiny Llama whose FFs 0-2 are one module (about 5 s to tie)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=64, vocab_size=V, max_position_embeddings=64, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    calibration = [{"input_ids": rows(2, offset=8 + 2 * s)} for s in range(3)]
    result = fxfuse.tie(model, calibration, windows=[tuple(TIED)])
    assert result.config.fxfuse_ties == {m: SHARED for m in MEMBERS}
    assert_tied(result)
    return model, result


@pytest.fixture(scope="module")
def trained(tied, tmp_path_factory):
    """(trainer, the tied model it trained, the tied model's state before): 3 Trainer steps on CPU."""
    model = copy.deepcopy(tied[1]).train()
    assert_tied(model)  # deepcopy keeps a module registered at several paths one object
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path_factory.mktemp("trainer")),
                                   train_dataset=TextRows())
    trainer.train()
    return trainer, model, before


def test_trainer_fine_tunes_a_tied_model_and_keeps_the_ties(tied, trained):
    trainer, model, before = trained
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.state.global_step == 3
    # Trainer did not wrap or replace the model on CPU, and its modules are still shared
    assert trainer.model is model and type(model) is type(tied[0])
    assert_tied(model)
    assert n_params(model) == n_params(tied[1]) < n_params(tied[0])
    # the optimizer holds every parameter once: the shared FF's weights are one entry, not one per member
    in_optimizer = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(set(in_optimizer)) == len(list(model.parameters()))
    assert set(in_optimizer) == {id(p) for p in model.parameters()}
    # the shared FF's weights (and the untied FF's) were trained; the member keys read the very same tensors
    state = model.state_dict()
    for p in PROJECTIONS:
        for layer in (SHARED, "model.layers.3.mlp"):
            key = f"{layer}.{p}.weight"
            assert not torch.equal(state[key], before[key]), key
        for member in MEMBERS:
            assert state[f"{member}.{p}.weight"].data_ptr() == state[f"{SHARED}.{p}.weight"].data_ptr()


def untie(model):
    """A copy of ``model`` in which every member path holds its own clone of the shared module: the same
    function and weights, no sharing (the oracle)."""
    untied = copy.deepcopy(model)
    for member, shared in untied.config.fxfuse_ties.items():
        untied.set_submodule(member, copy.deepcopy(untied.get_submodule(shared)))
    del untied.config.fxfuse_ties
    return untied


def test_the_shared_weights_receive_the_sum_of_every_member_sites_gradient(tied):
    model = copy.deepcopy(tied[1]).double().train()  # dropout is 0 in this config: train mode is deterministic
    assert_tied(model)  # .double() converts the shared module's parameters in place, keeping it shared
    oracle = untie(model)
    assert len(set(ff_ids(oracle))) == 4
    x = rows(2, offset=20)
    assert rel(oracle(input_ids=x).logits, model(input_ids=x).logits) == 0.0  # same function before the gradients

    model(input_ids=x, labels=x).loss.backward()
    oracle(input_ids=x, labels=x).loss.backward()
    for p in PROJECTIONS:
        tied_grad = model.get_submodule(SHARED).get_submodule(p).weight.grad
        sites = [oracle.get_submodule(f"{path}.{p}").weight.grad for path in [SHARED, *MEMBERS]]
        assert all(g is not None and g.abs().max() > 0 for g in sites)
        assert min(rel(a, b) for a in sites for b in sites if a is not b) > 1e-3  # each site contributes its own
        assert rel(tied_grad, sum(sites)) <= 1e-10, p
        assert all(rel(tied_grad, g) > 1e-3 for g in sites)  # not just one site's gradient
        # the untied FF (layer 3) gets its own gradient, as in the oracle
        lone = f"model.layers.3.mlp.{p}"
        assert rel(model.get_submodule(lone).weight.grad, oracle.get_submodule(lone).weight.grad) <= 1e-10


def test_save_pretrained_after_training_reloads_with_the_ties_and_the_same_logits(trained, tmp_path):
    trainer, model, _ = trained
    x = rows(2, offset=24)
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    trainer.save_model(str(tmp_path / "trainer"))  # Trainer's own save (a state_dict passed to save_pretrained)
    for name in ("saved", "trainer"):
        again = fxfuse.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / name)
        assert type(again) is type(model) and n_params(again) == n_params(model)
        assert_tied(again)
        assert torch.equal(logits(again, x), expected), name
        assert (tmp_path / name / "model.safetensors").stat().st_size == (
            tmp_path / "saved" / "model.safetensors").stat().st_size  # one copy of the shared FF on disk, both ways


def lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoraLayer)}


def test_peft_lora_wraps_the_shared_ff_once_trains_only_adapters_and_merges_back_tied(tied, tmp_path):
    """peft finds its targets with ``named_modules()``, which yields a module registered at several paths once
    (at its first path): the shared FF's projections are wrapped once, and that one wrapped module serves
    every member path. One set of adapters for the shared FF, one for layer 3's."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(tied[1])
    reference = copy.deepcopy(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                                                     task_type="CAUSAL_LM"))
    inner = lora.get_base_model()
    assert inner is base and type(inner) is type(tied[0])
    assert_tied(inner)
    wrapped = lora_layers(inner)  # with remove_duplicate=False: every path, the members' too
    assert len(wrapped) == 4 * 3 and len({id(m) for m in wrapped.values()}) == 2 * 3
    for p in PROJECTIONS:
        shared = inner.get_submodule(f"{SHARED}.{p}")
        assert all(wrapped[f"{m}.{p}"] is shared for m in MEMBERS)
        assert type(shared.base_layer) is torch.nn.Linear  # wrapped once: no LoRA layer inside a LoRA layer
        assert list(shared.lora_A) == ["default"]
    trainable = [n for n, q in lora.named_parameters() if q.requires_grad]
    assert len(trainable) == 2 * 3 * 2 and all("lora_" in n for n in trainable)  # A and B, 3 projections, 2 FFs
    assert not any(f"{m}." in n for n in trainable for m in MEMBERS)  # named at the shared (first) path only

    x = rows(2, offset=28)
    assert torch.equal(logits(lora, x), logits(reference, x))  # B = 0 at start: the tied model's function
    lora.train()
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    trainer = transformers.Trainer(model=lora, args=arguments(tmp_path / "trainer"), train_dataset=TextRows())
    trainer.train()
    after = lora.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)  # the base (tied) weights are frozen
    assert any(k.startswith(f"base_model.model.{SHARED}.") for k in changed)
    assert_tied(inner)

    tuned = logits(lora, x)
    assert rel(tuned, logits(reference, x)) > 1e-4  # the adapters changed the function
    prompt = rows(1, offset=30)[:, :5]
    out = lora.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)

    # the adapter alone, saved and loaded on the reloaded tied base: one copy in the file, the same logits
    lora.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 12 and not any(f"{m}." in k for k in keys for m in MEMBERS)
    reference.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(
            fxfuse.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "base"), tmp_path / "adapter")
    # peft reports the member paths' adapter keys missing: they are the shared module's, loaded at its first path
    missing = _listed(str(w.message) for w in caught if "missing adapter keys" in str(w.message))
    members = {f"base_model.model.{m}.{p}.{ab}.default.weight" for m in MEMBERS for p in PROJECTIONS
               for ab in ("lora_A", "lora_B")}
    assert set(missing) <= members  # peft 0.21.2: exactly these 12; none that is not an alias of a loaded key
    assert_tied(again.get_base_model())
    assert torch.equal(logits(again, x), tuned)

    merged = lora.merge_and_unload()
    assert type(merged) is type(tied[0]) and merged is base
    assert not lora_layers(merged) and type(merged.get_submodule(f"{SHARED}.gate_proj")) is torch.nn.Linear
    assert_tied(merged)
    assert n_params(merged) == n_params(reference)
    assert rel(logits(merged, x), tuned) <= 1e-5
    # the merged model saves and reloads tied, as any tied model
    merged.save_pretrained(tmp_path / "merged")
    reloaded = fxfuse.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "merged")
    assert_tied(reloaded)
    assert torch.equal(logits(reloaded, x), logits(merged, x))


def _listed(messages):
    """The keys in peft's 'Found missing adapter keys while loading the checkpoint: [...]' warnings."""
    import ast
    return [k for m in messages for k in ast.literal_eval(m[m.index("["):m.rindex("]") + 1])]
