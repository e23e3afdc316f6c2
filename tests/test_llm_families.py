"""Every causal-LM family of the installed transformers, composed into a tiny VLM.

The families come from transformers' own ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; each builds
from its default config shrunk by :data:`_GENERIC` (only the keys the family has) and the
per-family entries of :data:`_FAMILY`. The composed model's logits and loss (embed -> body ->
logits, head only at supervised positions) must equal the LLM's own forward in fp32.

What is not ours is reported, not failed: a family whose tiny config transformers itself refuses,
whose model transformers cannot build or run, or whose forward takes no ``inputs_embeds`` (no
place for visual tokens) is skipped with that reason (see :func:`compose_family`). Everything
else, including any difference from the LLM's own forward, fails. The terminal summary counts the
families that compose exactly (``tests/conftest.py``), so a drop is visible.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import vlm_adapters
from vlm_adapters.llm.base import _accepts, decoder_route
from vlm_adapters.testing import tiny_connector_config, tiny_vision_config

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
ATOL = 1e-5

_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
_GENERIC: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "is_decoder": True,  # encoder families (BERT...) as causal LMs
    # encoder-decoder families' decoder halves (BART, Marian, Whisper...)
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # state-space and linear-attention layers
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_d_ssm": 64,
    "mamba_d_state": 8,
    "mamba_chunk_size": 16,
    "linear_num_heads": 4,
    "linear_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "num_experts_per_token": 2,
    # multi-head latent attention
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # head post-processing, made large enough for a missing step to show
    "final_logit_softcapping": 2.0,  # Gemma 2/3/3n/4, VaultGemma, Beam, NanoChat, Inkling 2
    "logits_soft_cap": 2.0,  # RecurrentGemma
    "output_logit_soft_cap": 2.0,  # xLSTM
    "logits_scaling": 4.0,  # Granite (divides), HyperCLOVA X (multiplies)
    "logit_scale": 4.0,  # Cohere
    "lm_head_multiplier": 3.0,  # Falcon-H1
    # per-layer input embeddings (Gemma 3n / 4)
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
    # vision / audio sub-configs of multimodal causal LMs
    "image_size": 32,
    "patch_size": 8,
    **_IDS,
}
"""Shrinks every family (and sub-config) that has the key: ``AutoConfig.for_model`` defaults
are full-size models."""

_GEMMA3N = {"num_kv_shared_layers": 0, "laurel_rank": 8}  # no KV sharing among 2 layers
_GEMMA4 = {"global_head_dim": 16}  # per-layer head_dim of the full-attention layers
_QWEN4 = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 8,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
    "hc_lowrank": 8,
}
_DOTS3 = {
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "swa_q_lora_rank": 16,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 16,
    "swa_qk_nope_head_dim": 8,
    "swa_qk_rope_head_dim": 8,
    "swa_v_head_dim": 8,
    "index_topk": 4,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "sliding_window": 4,
    "shared_experts_intermediate_size": 32,
}
_FAMILY: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},
    "codegen": {"rotary_dim": 4},
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    },
    "dory": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
        "sliding_window": 4,
    },
    "dbrx": {
        "d_model": 32,  # copied into ffn_config before the hidden_size alias is applied
        # the model reads rope_theta (not a field) and clamps with clip_qkv (None by default)
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "dots1": {"n_shared_experts": 1},
    "dots3_note": {
        "text_config": _DOTS3,
        "vision_config": {"adapter_in_dim": 32, "adapter_out_dim": 32},
        "audio_config": {"adapter_input_size": 32, "adapter_out_dim": 32},
    },
    "dots3_note_text": _DOTS3,
    "gemma3n": {"text_config": _GEMMA3N},
    "gemma3n_text": _GEMMA3N,
    "gemma4": {"text_config": _GEMMA4},
    "gemma4_text": _GEMMA4,
    "gemma4_unified": {"text_config": _GEMMA4},
    "gemma4_unified_text": _GEMMA4,
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "attention_layers": None},
    "gptj": {"rotary_dim": 4},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_dt_rank": 4,
        "use_mamba_kernels": False,
    },
    "kolibri1_1": {  # one sliding and one indexed-attention layer, each with its own K/V
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "indexed_attention"],
        "kv_source_layers": [0, 1],
        "index_layers": [1],
        "mlp_only_layers": [0],
        "mlp_only_intermediate_size": 64,
        "head_dim": 16,  # its validator wants a multiple of 16 (NVFP4 key rounding)
        "index_num_heads": 2,
        "index_pool_size": 16,
        "index_compression": 4,
        "index_topk": 4,
        "index_num_local_tokens": 4,
        "index_num_sink_tokens": 2,
        "sliding_window": 4,
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 1, "state_size": 8, "chunk_size": 16},
    "qwen4_exp": {"text_config": _QWEN4},
    "qwen4_exp_text": _QWEN4,
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32},
    "reformer": {"axial_pos_embds_dim": [16, 16], "axial_pos_shape": [16, 16]},
    "xlnet": {"max_position_embeddings": None, "d_head": 8},
    "xlstm": {"embedding_dim": 32, "num_heads": 4, "num_blocks": 2, "chunk_size": 8},
    "xmod": {"default_language": "en_XX"},
    "zamba": {  # two hybrid layers: they share one transformer block
        "num_hidden_layers": 3,
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
        "attention_hidden_size": 64,
        "attention_head_dim": 16,
        "mamba_dt_rank": 4,
        "use_mamba_kernels": False,
    },
    "zaya": {"num_experts_per_tok": 1},
}
"""Per-family overrides on top of the generic shrinking (``None`` removes a generic key)."""

_EVAL_ONLY: dict[str, str] = {
    "reformer": "trains only on sequences padded to prod(axial_pos_shape) (and its reversible "
    "layers backprop only in train mode): the loss check needs variable-length batches",
}
"""Families whose logits are checked but which cannot run the training-mode loss check."""

_CODEBOOKS = (
    "audio-codebook decoder: input_ids are [batch x num_codebooks, T] and each codebook has its "
    "own embedding table and head (logits [batch x codebooks, T, V]): not one token stream"
)
_SKIP: dict[str, str] = {
    "blt": "decoder requires input_ids: byte hash n-gram embeddings and entropy patching are "
    "computed from the ids, so inputs_embeds cannot carry visual tokens",
    "cpmant": "decoder requires input_ids: CPM-Ant builds its prompt, segment and position "
    "inputs from the ids and has no inputs_embeds path",
    "deepseek_v4": "decoder requires input_ids: hash-routed MoE layers pick experts by token id "
    "(tid2eid[input_ids]), which a visual token does not have",
    "gemma4_assistant": "speculative-decoding drafter, not a standalone LM: its forward requires "
    "the target model's shared_kv_states and backbone hidden states",
    "gemma4_unified_assistant": "speculative-decoding drafter, not a standalone LM: its forward "
    "requires the target model's shared_kv_states and backbone hidden states",
    "musicgen": _CODEBOOKS,
    "musicgen_melody": _CODEBOOKS,
    "prophetnet": "logits come from the decoder's n-gram predicting stream (outputs[1]), not from "
    "its last_hidden_state: there is no single hidden state for the head",
}
"""Families that cannot be composed, with the reason shown in the skip summary."""


def tiny_llm_config(model_type: str) -> dict[str, Any]:
    """A tiny inline config (with ``model_type``) for ``model_type``; skips when impossible."""
    if model_type in _SKIP:
        pytest.skip(f"{model_type}: {_SKIP[model_type]}")
    try:
        default = AutoConfig.for_model(model_type)
    except Exception as error:  # noqa: BLE001 - any failure to build is a reason to skip
        pytest.skip(f"{model_type}: config cannot build offline: {_first_line(error)}")
    config = _merge(_shrunk(default), _FAMILY.get(model_type, {}))
    return {"model_type": model_type, **config}


def _shrunk(default: Any) -> dict[str, Any]:
    """The :data:`_GENERIC` keys ``default`` has (and can set), dropout off, per-layer lists cut
    to one layer of each kind (in order, at least two layers), sub-configs shrunk alike."""
    config = {k: v for k, v in _GENERIC.items() if _settable(default, k)}
    if _settable(default, "kv_lora_rank"):  # latent attention: one kv head per query head
        config["num_key_value_heads"] = config.get("num_attention_heads", 4)
    fields = vars(default)
    spare = iter(range(_GENERIC["vocab_size"] - 1, 0, -1))
    for key, value in fields.items():  # multimodal placeholder ids inside the tiny vocabulary
        placeholder = key.endswith(("_token_id", "_token_index")) and key not in _IDS
        if placeholder and isinstance(value, int) and value >= _GENERIC["vocab_size"]:
            config[key] = next(spare)
    for key, value in fields.items():
        if isinstance(value, float) and any(word in key for word in _STOCHASTIC):
            config[key] = 0.0
    depth = getattr(default, "num_hidden_layers", None)
    per_layer = {
        k: v
        for k, v in fields.items()
        if isinstance(v, list) and isinstance(depth, int) and depth > 2 and len(v) == depth
    }
    if per_layer:
        kinds = {k: list(dict.fromkeys(map(repr, v))) for k, v in per_layer.items()}
        layers = max(2, *map(len, kinds.values()))
        config["num_hidden_layers"] = layers
        for key, values in per_layer.items():
            if key in _GENERIC:
                config[key] = [_GENERIC[key]] * layers
                continue
            firsts = [values[[repr(x) for x in values].index(kind)] for kind in kinds[key]]
            config[key] = (firsts + [firsts[-1]] * layers)[:layers]
    for key, value in fields.items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            config[key] = {"model_type": value.model_type, **_shrunk(value)}
    return config


_STOCHASTIC = ("dropout", "pdrop", "drop_rate", "drop_path", "jitter")
"""Float config keys set to 0 so that train mode is deterministic."""


def _settable(config: Any, key: str) -> bool:
    attr = getattr(type(config), key, None)
    if isinstance(attr, property) and attr.fset is None:
        return False
    raw = getattr(config, "_hasattr_without_heterogeneous_validation", None)
    return raw(key) if callable(raw) else hasattr(config, key)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested dicts merge, ``None`` removes a key."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _first_line(error: BaseException) -> str:
    text = " ".join(
        str(e).strip().splitlines()[0] for e in (error, error.__cause__) if e and str(e)
    )
    return f"{type(error).__name__}: {text[:200]}"


def _build(model_type: str, tokenizer_dir: str) -> vlm_adapters.VisionLanguageModel:
    return _compose(tiny_llm_config(model_type), tokenizer_dir)


def _compose(llm_config: dict[str, Any], tokenizer_dir: str) -> vlm_adapters.VisionLanguageModel:
    config = {
        "vision": tiny_vision_config("hf"),
        "connector": tiny_connector_config("mlp"),
        "llm": {"type": "hf", "tokenizer": tokenizer_dir, "config": llm_config},
    }
    torch.manual_seed(0)
    with _quiet():
        return vlm_adapters.build_vlm(config).eval()


def compose_family(model_type: str, tokenizer_dir: str) -> vlm_adapters.VisionLanguageModel:
    """The tiny composed model of ``model_type``; skips (with the reason) only where plain
    transformers cannot build or run the family's tiny LLM, or its forward takes no embeddings.
    Any failure after that is ours."""
    config = tiny_llm_config(model_type)
    upstream = _upstream_problem(config)
    if upstream:
        pytest.skip(f"{model_type}: {upstream}")
    return _compose(config, tokenizer_dir)


def _upstream_problem(config: dict[str, Any]) -> str | None:
    """Why plain transformers refuses the tiny config, cannot build or run its causal LM, or
    cannot take embeddings in place of token ids (no place for visual tokens); or None."""
    data = dict(config)
    model_type = data.pop("model_type")
    ids = torch.tensor([[5, 6, 7, 8]])
    reason = "transformers refuses its tiny config"
    try:
        with torch.no_grad(), _quiet():
            hf_config = AutoConfig.for_model(model_type, **data)
            reason = "transformers cannot build its model"
            lm = AutoModelForCausalLM.from_config(hf_config).eval()
            plain = {"use_cache": False} if _accepts(lm, "use_cache") else {}  # as full_logits
            reason = "transformers' own forward fails"
            lm(input_ids=ids, **plain)
            reason = "cannot hold visual tokens: its forward refuses inputs_embeds"
            lm(inputs_embeds=lm.get_input_embeddings()(ids), **plain)
    except Exception as error:  # noqa: BLE001 - whatever transformers raises is the reason
        return f"{reason}: {_first_line(error)}"
    return None


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _text_batch(model: vlm_adapters.VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Three right-padded text-only samples of different lengths, with labels."""
    texts = ["what colour is the circle ? red", "a small blue square", "the triangle"]
    batch = model.processor(texts, None, padding_side="right")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[0, :3] = -100  # an unsupervised prompt
    return {**batch, "labels": labels}


def _naive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy over the supervised positions of full logits ``[B, T, V]``."""
    logits = logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tokenizer_dir: str) -> tuple[str, Any]:
    """``(model_type, tiny composed model)``, built once for both tests of the family."""
    return request.param, compose_family(request.param, tokenizer_dir)


def test_text_logits_match_the_llm_forward(family: tuple[str, Any]) -> None:
    _, model = family
    batch = _text_batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.eval()
    with torch.no_grad(), _quiet():
        ours = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        theirs = model.llm.full_logits(ids, mask)  # [B, T, V]
    assert ours.shape == theirs.shape
    keep = mask.bool()  # padded positions may differ (e.g. position ids from the ids)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=ATOL)


def test_loss_matches_the_naive_loss_and_trains(family: tuple[str, Any]) -> None:
    model_type, model = family
    if model_type in _EVAL_ONLY:
        pytest.skip(f"{model_type}: {_EVAL_ONLY[model_type]}")
    batch = _text_batch(model)
    model.train()  # dropout is off in these configs: train mode is deterministic too
    model.zero_grad()
    with _quiet():
        out = model(**batch)  # head applied to the [K, H] supervised positions only
        naive = _naive_loss(
            model.llm.full_logits(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )
    torch.testing.assert_close(out.loss, naive, rtol=0, atol=ATOL)
    out.loss.backward()
    lm = model.llm.causal_lm
    head, embeddings = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    assert head.grad is not None and bool(head.grad.abs().sum() > 0)
    inner = [p.grad for p in lm.parameters() if p is not head and p is not embeddings]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in inner)


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma2", "bert", "opt", "falcon_h1"])
def test_exact_head_with_lora_and_gradient_checkpointing(
    tokenizer_dir: str, model_type: str
) -> None:
    """Head post-processing (scaling, soft-capping, a head transform, a nested decoder, a
    multiplier read from the decoder) survives the peft wrapper and checkpointing."""
    from peft import PeftModel

    from vlm_adapters.model.lora import LoraSettings, apply_lora

    model = _build(model_type, tokenizer_dir)
    with _quiet():  # "all-linear" leaves out what peft refuses (Mamba's out_proj, conv1d)
        apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        model.llm.enable_gradient_checkpointing()
    assert isinstance(model.llm.model, PeftModel)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert not [n for n in adapted if n.endswith((".out_proj", ".conv1d")) and "mamba" in n]
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the output
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(0, 0.5)
    model.train()
    batch = _text_batch(model)
    modules = dict(model.named_modules())
    with _quiet():
        out = model(**batch)
        full = model.llm.full_logits(batch["input_ids"], batch["attention_mask"])
    assert dict(model.named_modules()) == modules  # the stubbed forward left the model alone
    torch.testing.assert_close(out.loss, _naive_loss(full, batch["labels"]), rtol=0, atol=ATOL)
    out.loss.backward()
    lora = [p.grad for n, p in model.llm.named_parameters() if ".lora_" in n]
    assert lora and all(g is not None for g in lora)
    assert any(bool(g.abs().sum() > 0) for g in lora)


@pytest.mark.parametrize("model_type", ["granite", "opt", "bert", "gemma3"])
def test_head_runs_alone_on_any_shape(tokenizer_dir: str, model_type: str) -> None:
    """``logits`` takes ``[K, H]`` or ``[B, T, H]``, gives the same rows either way, passes
    gradients to ``hidden`` and never runs the decoder (OPT: nested ``model.decoder``; gemma3:
    a multimodal wrapper around the text decoder)."""
    model = _build(model_type, tokenizer_dir)
    llm = model.llm
    decoder = llm.causal_lm.get_submodule(decoder_route(llm.causal_lm)[0])
    calls: list[str] = []
    for name, module in decoder.named_modules():
        module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    hidden = torch.randn(2, 3, llm.hidden_size, requires_grad=True)
    with _quiet():
        grid = llm.logits(hidden)  # [B, T, V]
        rows = llm.logits(hidden.reshape(6, -1))  # [K, V]
    assert not calls
    assert grid.shape == (2, 3, llm.vocab_size) and rows.shape == (6, llm.vocab_size)
    torch.testing.assert_close(rows, grid.reshape(6, -1), rtol=0, atol=ATOL)
    rows.sum().backward()
    assert hidden.grad is not None and bool(hidden.grad.abs().sum() > 0)


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma2", "falcon_h1"])
def test_export_refuses_an_llm_that_post_processes_its_head(
    tokenizer_dir: str, model_type: str
) -> None:
    from vlm_adapters.export import check_exportable

    model = _build(model_type, tokenizer_dir)
    assert "post-processes its head output" in (check_exportable(model) or "")


class _RefusingConfig(PretrainedConfig):
    """A model type from a future transformers whose validator refuses small layouts."""

    model_type = "vlm_adapters_refusing"

    def __init__(self, num_hidden_layers: int = 12, **kwargs: Any) -> None:
        if num_hidden_layers < 10:
            raise ValueError("Layer 1 must read the K/V of an earlier layer that produces its own.")
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


def test_a_family_transformers_refuses_is_reported_with_the_reason(
    tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CONFIG_MAPPING._extra_content, _RefusingConfig.model_type, _RefusingConfig)
    with pytest.raises(pytest.skip.Exception) as skipped:
        compose_family(_RefusingConfig.model_type, tokenizer_dir)
    reason = str(skipped.value)
    assert "transformers refuses its tiny config" in reason
    assert "Layer 1 must read the K/V" in reason


def test_a_composition_that_differs_from_the_llm_forward_still_fails(
    tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = compose_family("llama", tokenizer_dir)
    test_text_logits_match_the_llm_forward(("llama", model))  # exact as composed
    head = model.llm.logits
    monkeypatch.setattr(model.llm, "logits", lambda hidden: head(hidden) * 1.01)
    with pytest.raises(AssertionError):
        test_text_logits_match_the_llm_forward(("llama", model))
    with pytest.raises(AssertionError):
        test_loss_matches_the_naive_loss_and_trains(("llama", model))


def test_a_failure_in_our_composition_is_not_reported_as_upstream(
    tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers builds and runs the family: an error while we compose it fails the test."""

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("our composition broke")

    monkeypatch.setattr(vlm_adapters, "build_vlm", broken)
    with pytest.raises(RuntimeError, match="our composition broke"):
        compose_family("llama", tokenizer_dir)
