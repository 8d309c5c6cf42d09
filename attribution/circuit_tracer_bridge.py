"""Our GPT-2 (+ CLT) inside TransformerLens and circuit-tracer, offline.

Used by the circuit-tracer cross-check test and benchmark, by sae-lens SAE training (which runs on a
TransformerLens model), and by anyone who wants those tools on our models. The HF weights are converted with
TransformerLens's GPT-2 converter into a
`HookedTransformerConfig`-built model; LayerNorms are *not* folded, so `blocks.l.ln2.hook_normalized`
is exactly our MLP input (ln_2's output) and the exported CLT reads it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch


def hooked_transformer_config(hf_config, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=hf_config.n_layer,
        d_model=hf_config.n_embd,
        n_heads=hf_config.n_head,
        d_head=hf_config.n_embd // hf_config.n_head,
        d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
        n_ctx=hf_config.n_positions,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.activation_function,
        normalization_type="LN",
        positional_embedding_type="standard",
        eps=hf_config.layer_norm_epsilon,
        default_prepend_bos=False,
        model_name="multilingual-clt-gpt2",
        dtype=dtype,
        device=device,
    )


def hooked_transformer(model, tokenizer=None, dtype: torch.dtype = torch.float32, cls=None):
    """A TransformerLens model (`cls`, default `HookedTransformer`) with `model`'s weights, loaded strictly:
    a silently partial load would give a random model that still runs."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    cfg = hooked_transformer_config(model.config, dtype=dtype)
    converted = (cls or HookedTransformer)(cfg, tokenizer=tokenizer)
    state = {name: value.detach().to(dtype) for name, value in convert_gpt2_weights(model, cfg).items()}
    state.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab, dtype=dtype))  # GPT-2's lm_head has no bias
    missing, unexpected = converted.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith((".IGNORE", ".mask"))]
    if missing or unexpected:
        raise ValueError(
            f"TransformerLens conversion did not match: missing {missing}, unexpected {unexpected}"
        )
    return converted.eval()


def circuit_tracer_model(model, tokenizer, clt_export_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A circuit-tracer `TransformerLensReplacementModel` with `model`'s weights and the CLT exported by
    `clt.export.export_circuit_tracer` (a cross-layer transcoder directory)."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    replacement = hooked_transformer(model, tokenizer, dtype, cls=TransformerLensReplacementModel)
    transcoder = load_clt(
        str(clt_export_dir),
        feature_input_hook="ln2.hook_normalized",
        feature_output_hook="hook_mlp_out",
        scan="multilingual-clt",
        lazy_decoder=False,
        lazy_encoder=False,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    # Weights first, transcoder second (configuring wraps the MLPs, which renames their parameters).
    replacement._configure_replacement_model(transcoder)
    return replacement.eval()
