"""QLoRA: a bitsandbytes 4-/8-bit LLM with LoRA adapters, its checkpoints and merging.

bitsandbytes runs on CPU (>= 0.46.1), so the real path is tested here end to end with a
64-wide llama (its CPU inference kernels need layers at least one 64-value block wide). Without
bitsandbytes those tests skip and the one-line config error is tested instead.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.cli import main
from vlm_adapters.config import model_config_from_dict
from vlm_adapters.errors import CheckpointError, ConfigError
from vlm_adapters.llm import hf
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.model.lora import (
    LoraSettings,
    has_lora,
    is_quantized,
    load_weights,
    merge_lora,
    save_lora,
)
from vlm_adapters.quantization import quantized_layers
from vlm_adapters.testing import tiny_model_config, tiny_tokenizer
from vlm_adapters.training.config import AlignStage, FinetuneStage
from vlm_adapters.training.recipes import configure_stage, describe_trainable, ensure_lora

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
needs_bnb = pytest.mark.skipif(
    hf.bitsandbytes_problem() is not None, reason=f"bitsandbytes: {hf.bitsandbytes_problem()}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny full-precision llama checkpoint on disk (what `llm.model` points at)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(**LLAMA)
    path = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _config(tok_dir, llm_dir, **quantization):
    config = tiny_model_config(tok_dir)
    config["llm"] = {"type": "hf", "model": llm_dir, "tokenizer": tok_dir}
    if quantization:
        config["llm"]["quantization"] = quantization
    return config


def _model(tok_dir, llm_dir, bits=4):
    torch.manual_seed(0)
    return build_vlm(_config(tok_dir, llm_dir, bits=bits))


def _batch(model):
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (0, 90, 250))]
    return model.processor(["<image> red circle", "<image> blue square left"], images)


def _logits(model, batch, train=True):
    """Logits in train mode by default (dropout is 0 here): 8-bit layers then compute with
    their dequantized weights, where eval mode quantizes the activations too."""
    with torch.no_grad():
        return model.train(train)(**batch).logits


def _qlora(tok_dir, llm_dir, bits=4, randomize=True):
    """A quantized model set up for the finetune stage with LoRA; its adapters randomized
    (LoRA B starts at zero, a no-op) unless ``randomize`` is false."""
    model = _model(tok_dir, llm_dir, bits)
    configure_stage(model, "finetune", FinetuneStage(train_llm="lora", lora=SETTINGS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name and randomize:
                param.normal_(0, 0.5)
    return model


def _missing(monkeypatch):
    message = "needs bitsandbytes, which is not installed; run `pip install 'vlm-adapters[qlora]'`"
    monkeypatch.setattr(hf, "bitsandbytes_problem", lambda: message)


def test_missing_bitsandbytes_is_a_one_line_config_error_before_building(
    tok_dir, llm_dir, monkeypatch
):
    _missing(monkeypatch)
    built, load = [], hf._load_model
    monkeypatch.setattr(hf, "_load_model", lambda cfg: built.append(cfg) or load(cfg))
    with pytest.raises(ConfigError) as error:
        model_config_from_dict(_config(tok_dir, llm_dir, bits=4), "train.yaml")
    message = str(error.value)
    assert "\n" not in message and message.startswith("train.yaml: llm.quantization: ")
    assert "bitsandbytes" in message and "pip install 'vlm-adapters[qlora]'" in message
    with pytest.raises(ConfigError, match="llm.quantization: .*not installed"):
        build_vlm(_config(tok_dir, llm_dir, bits=8))
    assert not built
    build_vlm(_config(tok_dir, llm_dir))  # without quantization nothing needs bitsandbytes
    assert built


def test_bitsandbytes_problem_names_the_fix(monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    try:
        monkeypatch.setattr(hf.metadata, "version", absent)
        hf.bitsandbytes_problem.cache_clear()
        assert "not installed; run `pip install 'vlm-adapters[qlora]'`" in hf.bitsandbytes_problem()
        monkeypatch.setattr(hf.metadata, "version", lambda name: "0.43.0")
        hf.bitsandbytes_problem.cache_clear()
        assert ">= 0.46.1, found 0.43.0" in hf.bitsandbytes_problem()
    finally:
        monkeypatch.undo()
        hf.bitsandbytes_problem.cache_clear()


def test_quantization_settings_are_checked(tok_dir, llm_dir, monkeypatch):
    monkeypatch.setattr(hf, "bitsandbytes_problem", lambda: None)
    parsed = model_config_from_dict(_config(tok_dir, llm_dir, bits=4))
    settings = parsed.llm.params.quantization
    assert (settings.quant_type, settings.double_quant, settings.compute_dtype) == (
        "nf4",
        True,
        None,
    )
    bad = [
        ({"bits": 3}, "llm.quantization.bits"),
        ({"bits": 4, "quant_type": "int4"}, "llm.quantization.quant_type"),
        ({"bits": 8, "quant_type": "nf4"}, "apply to bits: 4 only"),
        ({"bits": 4, "compute_dtype": "int8"}, "llm.quantization.compute_dtype"),
        ({"bits": 4, "cache_dir": "/tmp"}, "unknown key"),
    ]
    for quantization, expected in bad:
        with pytest.raises(ConfigError, match=expected):
            model_config_from_dict(_config(tok_dir, llm_dir, **quantization))
    inline = tiny_model_config(tok_dir)
    inline["llm"]["config"]["quantization_config"] = {"quant_method": "bitsandbytes"}
    with pytest.raises(ConfigError, match="may not carry `quantization_config`"):
        model_config_from_dict(inline)


def test_a_checkpoint_stored_quantized_is_refused(tok_dir, llm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "bitsandbytes_problem", lambda: None)
    stored = json.loads((Path(llm_dir) / "config.json").read_text())
    stored["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="stored quantized .*full-precision"):
        model_config_from_dict(_config(tok_dir, str(tmp_path), bits=4))


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_only_adapters_and_connector(tok_dir, llm_dir, bits):
    import bitsandbytes as bnb

    model = _qlora(tok_dir, llm_dir, bits, randomize=False)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = quantized_layers(model)
    assert is_quantized(model) and model.llm.is_quantized
    assert len(quantized) == 14 and all(isinstance(m, layer) for m in quantized.values())
    assert all(n.startswith("llm.") and "lm_head" not in n for n in quantized)
    packed = {n: m.weight.detach().clone() for n, m in quantized.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    connector = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    assert connector <= trainable
    assert trainable - connector and all(".lora_" in n for n in trainable - connector)
    # k-bit preparation upcast what stays unquantized in the LLM (norms, embeddings, head)
    assert model.llm.causal_lm.lm_head.weight.dtype == torch.float32

    batch = _batch(model)
    _logits(model, batch, train=False)  # an eval forward first leaves the layers trainable
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        frozen = [
            n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
        ]
        assert not frozen
        assert all(p.grad is not None for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(m.weight, packed[n]) for n, m in quantized_layers(model).items())


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_checkpoint_records_settings_and_reloads_bitwise(tok_dir, llm_dir, tmp_path, bits):
    model = _qlora(tok_dir, llm_dir, bits)
    batch = _batch(model)
    before = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")

    files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert not {p for p in files if p.rsplit(".", 1)[-1] in ("bin", "pt", "pth", "pkl", "ckpt")}
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    expected = {"bits": 4, "quant_type": "nf4", "double_quant": True} if bits == 4 else {"bits": 8}
    assert config["llm"]["quantization"] == expected
    assert "quantization_config" not in config["llm"]["config"] and "model" not in config["llm"]
    weights = load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    q_proj = "llm.model.model.layers.0.self_attn.q_proj"
    assert weights[f"{q_proj}.weight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
    stats = {k for k in weights if k.startswith(f"{q_proj}.") and k != f"{q_proj}.weight"}
    assert stats == (
        {f"{q_proj}.weight.{s}" for s in ("absmax", "quant_map", "nested_absmax")}
        | {f"{q_proj}.weight.{s}" for s in ("nested_quant_map", "quant_state.bitsandbytes__nf4")}
        if bits == 4
        else {f"{q_proj}.SCB", f"{q_proj}.weight_format"}
    )

    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert is_quantized(loaded) and has_lora(loaded)
    assert torch.equal(_logits(loaded, batch), before)
    assert torch.equal(_logits(loaded, batch, False), _logits(model, batch, False))
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lora_" in n)
    ensure_lora(loaded, SETTINGS)  # resuming: the adapters train on, the 4-bit base stays
    loaded.train()
    loaded(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if ".lora_" in n)

    with torch.no_grad():  # training goes on; resuming restores the saved state bitwise
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    assert not torch.equal(_logits(model, batch), before)
    load_weights(model, tmp_path / "ckpt", WEIGHTS_NAME)
    assert torch.equal(_logits(model, batch), before)


@needs_bnb
def test_a_tampered_quantized_checkpoint_is_refused(tok_dir, llm_dir, tmp_path):
    model = _qlora(tok_dir, llm_dir, 4)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / WEIGHTS_NAME
    original = load_file(path)
    key = "llm.model.model.layers.0.mlp.down_proj"

    def blob(**changes):
        fields = json.loads(bytes(original[f"{key}.weight.quant_state.bitsandbytes__nf4"].numpy()))
        data = json.dumps({**fields, **changes}).encode()
        return torch.tensor(list(data), dtype=torch.uint8)

    cases = [
        ({f"{key}.weight.quant_state.bitsandbytes__nf4": blob(dtype="load")}, "dtype is 'load'"),
        ({f"{key}.weight.quant_state.bitsandbytes__nf4": blob(shape=[64, 4096])}, "shape is"),
        ({f"{key}.weight.quant_state.bitsandbytes__nf4": blob(blocksize=4)}, "blocksize is 4"),
        ({f"{key}.weight.absmax": original[f"{key}.weight.absmax"][:-1]}, "absmax is"),
        ({f"{key}.weight": original[f"{key}.weight"].to(torch.int16)}, "weight is"),
    ]
    for changes, message in cases:
        save_file({**original, **changes}, str(path))
        with pytest.raises(CheckpointError, match=f"down_proj: .*{message}.*corrupt"):
            VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    stripped = {k: v for k, v in original.items() if k != f"{key}.weight.absmax"}
    save_file(stripped, str(path))
    with pytest.raises(CheckpointError, match="lacks weights"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")


@needs_bnb
def test_a_quantized_checkpoint_without_bitsandbytes_is_one_line(
    tok_dir, llm_dir, tmp_path, monkeypatch, capsys
):
    _qlora(tok_dir, llm_dir, 4).save_pretrained(tmp_path / "ckpt")
    _missing(monkeypatch)
    with pytest.raises(CheckpointError, match="llm.quantization: .*not installed"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'vlm-adapters[qlora]'" in err


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_dequantizes_with_a_warning(tok_dir, llm_dir, tmp_path, bits, capsys):
    model = _qlora(tok_dir, llm_dir, bits)
    batch = _batch(model)
    model.save_pretrained(tmp_path / "qlora")
    before = _logits(model, batch)
    with pytest.warns(UserWarning, match="dequantizing the bitsandbytes layers"):
        merged = merge_lora(model)
    assert not has_lora(merged) and not is_quantized(merged) and not merged.llm.is_quantized
    assert {p.dtype for p in merged.llm.parameters()} == {torch.float32}
    torch.testing.assert_close(_logits(merged, batch), before, atol=1e-4, rtol=0)

    assert main(["merge", str(tmp_path / "qlora"), "--out", str(tmp_path / "merged")]) == 0
    assert "is quantized; the merged checkpoint holds its dequantized" in capsys.readouterr().err
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert "quantization" not in config["llm"] and "lora" not in config
    weights = load_file(tmp_path / "merged" / WEIGHTS_NAME)
    assert weights["llm.model.model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert not is_quantized(reloaded)
    torch.testing.assert_close(_logits(reloaded, batch), before, atol=1e-4, rtol=0)


@needs_bnb
def test_inline_config_quantized_without_lora_round_trips_and_dequantizes(tok_dir, tmp_path):
    config = tiny_model_config(tok_dir)
    config["llm"]["config"] = dict(LLAMA)
    config["llm"]["quantization"] = {"bits": 4, "quant_type": "fp4", "double_quant": False}
    torch.manual_seed(0)
    model = build_vlm(config)  # random weights, quantized: how a checkpoint rebuilds
    assert is_quantized(model) and not has_lora(model)
    configure_stage(model, "align", AlignStage())  # align: only the connector trains
    assert all(n.startswith("connector.") for n, p in model.named_parameters() if p.requires_grad)
    batch = _batch(model)
    before = _logits(model, batch)
    (tmp_path / "ckpt").mkdir()
    save_lora(model, tmp_path / "ckpt", WEIGHTS_NAME)  # the weights save_pretrained writes
    torch.manual_seed(1)
    other = build_vlm(config)
    assert not torch.equal(_logits(other, batch), before)
    load_weights(other, tmp_path / "ckpt", WEIGHTS_NAME)
    assert torch.equal(_logits(other, batch), before)
    with pytest.warns(UserWarning, match="dequantizing"):
        merge_lora(other)
    assert not is_quantized(other)
    torch.testing.assert_close(_logits(other, batch), before, atol=1e-4, rtol=0)


@needs_bnb
def test_a_quantized_llm_cannot_train_fully(tok_dir, llm_dir, tmp_path):
    """Refused while the config is read (a training YAML) and by the stage recipe itself."""
    from vlm_adapters.training.config import train_config_from_dict

    config = _config(tok_dir, llm_dir, bits=4)
    data = {"path": str(tmp_path / "x.json")}
    whole = {**config, "data": {"finetune": data}, "recipe": ["finetune"]}
    with pytest.raises(ConfigError, match=r"train_llm: full cannot train a 4-bit LLM"):
        train_config_from_dict({**whole, "stages": {"finetune": {"train_llm": "full"}}})
    ok = {**whole, "stages": {"finetune": {"train_llm": "lora"}}}
    assert train_config_from_dict(ok).stages.finetune.train_llm == "lora"
    model = build_vlm(config)
    with pytest.raises(ConfigError, match="cannot train a 4-/8-bit LLM"):
        configure_stage(model, "finetune", FinetuneStage(train_llm="full"))


@needs_bnb
def test_a_quantized_model_without_lora_saves_loads_and_exports(tok_dir, llm_dir, tmp_path):
    from vlm_adapters.export import to_hf_llava

    model = build_vlm(_config(tok_dir, llm_dir, bits=8)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    to_hf_llava(loaded, tmp_path / "export")
    stored = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in stored.values())


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_the_stage_summary_counts_every_quantized_weight(tok_dir, llm_dir, bits):
    """4-bit layers store two weights per byte; the summary still counts the weights."""
    full = sum(p.numel() for p in build_vlm(_config(tok_dir, llm_dir)).llm.parameters())
    summary = describe_trainable(_model(tok_dir, llm_dir, bits), "finetune")
    line = next(line for line in summary.splitlines() if line.strip().startswith("llm"))
    assert int(line.split("/")[1].split()[0].replace(",", "")) == full
