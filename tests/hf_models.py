"""Tiny Hugging Face models (random weights, nothing downloaded) that torch.export.export captures with
dynamic batch and sequence length (transformers 5.x; recipes in /work/notes/hf_recipes.md).

Each builder returns ``(model, example_kwargs, make_kwargs)``: the model in eval mode, kwargs for
``model(**kw)`` / ``torch.export.export(model, (), kw, dynamic_shapes=..., strict=False)``, and
``make_kwargs(batch, seq, seed=0)`` giving fresh kwargs of another shape. Keep batch and seq >= 2 in
the example (a size of 1 is specialized by export). Flags: ``use_cache=False`` in the config (a
DynamicCache output cannot be exported), ``return_dict`` left alone (False breaks forward in 5.x).
"""
import torch
import transformers

V = 128  # vocabulary size of every text model


def _nudge(model):
    """Move every 1-D parameter (biases, norm scales) off its init: zeros and ones hide rewrite bugs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tokens(batch, seq, seed, token_type=False, decoder=False):
    """input_ids and a right-padded attention_mask (row 1), plus token_type_ids / decoder_input_ids."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq >= 3:
        mask[1, seq - seq // 3:] = 0  # right padding: no query row is fully masked
    kw = {"input_ids": torch.randint(0, V, (batch, seq), generator=g), "attention_mask": mask}
    if token_type:
        kw["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    if decoder:  # a decoder length unlike the encoder's, so the two stay separate symbols
        kw["decoder_input_ids"] = torch.randint(0, V, (batch, seq // 2 + 1), generator=g)
    return kw


def _text(model, **flags):
    """(model, example kwargs at batch 2 / seq 8, make_kwargs) for a text model."""
    return model, _tokens(2, 8, 0, **flags), lambda batch, seq, seed=0: _tokens(batch, seq, seed, **flags)


def gpt2():
    """GPT2LMHeadModel, 2 layers (Conv1D layers export as aten.addmm with the (in, out) weight)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return _text(_nudge(transformers.GPT2LMHeadModel(config)))


def bert():
    """BertForSequenceClassification, 2 layers, 3 labels (seq <= max_position_embeddings=64)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=V, max_position_embeddings=64, num_labels=3)
    return _text(_nudge(transformers.BertForSequenceClassification(config)), token_type=True)


def _decoder(config_class, model_class):
    """A 2-layer grouped-query-attention decoder of Llama's shape."""
    torch.manual_seed(0)
    config = config_class(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=V, max_position_embeddings=64, use_cache=False)
    return _text(_nudge(model_class(config)))


def llama():
    """LlamaForCausalLM (RMSNorm exports as pow/mean/rsqrt/mul)."""
    return _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM)


def qwen2():
    """Qwen2ForCausalLM (like Llama, plus q/k/v biases)."""
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


def vit():
    """ViTForImageClassification on 32x32 images, 5 labels; only the batch is dynamic (seq is ignored)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, num_labels=5)
    model = _nudge(transformers.ViTForImageClassification(config))

    def make(batch, seq=None, seed=0):
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}
    return model, make(2), make


def t5():
    """T5ForConditionalGeneration, 2+2 layers, eager attention (with sdpa the ONNX export fails)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, use_cache=False,
                                   attn_implementation="eager")
    return _text(_nudge(transformers.T5ForConditionalGeneration(config)), decoder=True)


def bart():
    """BartForConditionalGeneration, 2+2 layers (seq <= max_position_embeddings=64)."""
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64, use_cache=False)
    return _text(_nudge(transformers.BartForConditionalGeneration(config)), decoder=True)


def dynamic_shapes(kwargs):
    """Dim.AUTO on dim 0 of every input and dim 1 of integer inputs (batch, sequence); the rest static."""
    auto = torch.export.Dim.AUTO
    return {k: {0: auto, 1: auto} if not t.is_floating_point() else {0: auto} for k, t in kwargs.items()}


HF_MODELS = {"gpt2": gpt2, "bert": bert, "llama": llama, "qwen2": qwen2, "vit": vit, "t5": t5, "bart": bart}
