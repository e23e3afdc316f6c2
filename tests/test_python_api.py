"""The Python face: load_config and ModelConfig on the YAML shape, export and merge_lora from
the package root, from_pretrained / load with dtype, device_map and a hub revision, and the
warnings when the tokenizer and the LLM disagree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import vlm_adapters
from vlm_adapters import ConfigError, ModelConfig, VisionLanguageModel
from vlm_adapters.demo import build_word_tokenizer, shapes_vocabulary
from vlm_adapters.errors import CheckpointError, ExportError
from vlm_adapters.llm.hf import TokenizerWarning, tokenizer_disagreements
from vlm_adapters.model.lora import LoraSettings, apply_lora, has_lora
from vlm_adapters.plugins import get_registry
from vlm_adapters.testing import tiny_model_config


@pytest.fixture(scope="module")
def saved(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written by save_pretrained."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "vlm"
    vlm_adapters.build_vlm(tiny_model_config(tokenizer_dir)).save_pretrained(directory)
    return directory


def _logits(model: VisionLanguageModel) -> torch.Tensor:
    batch = model.processor(["<image> what is a red circle"], [Image.new("RGB", (32, 32))])
    with torch.no_grad():
        return model.eval()(**batch).logits


# load_config / ModelConfig: the YAML shape, typed, without building


def test_load_config_takes_a_dict_a_path_and_a_typed_config(
    tokenizer_dir: str, tmp_path: Path
) -> None:
    data = tiny_model_config(tokenizer_dir)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    from_dict = vlm_adapters.load_config(data, ["connector.depth=3"])
    from_path = vlm_adapters.load_config(path, {"connector.depth": 3})  # a Path, not only str
    typed = vlm_adapters.load_config(from_dict)
    assert from_dict.to_dict() == from_path.to_dict() == typed.to_dict()
    assert typed.connector.params.depth == 3 and typed is from_dict
    assert vlm_adapters.load_config(typed, ["connector.depth=4"]).connector.params.depth == 4
    model = vlm_adapters.build_vlm(path)
    assert model.component_types == {"vision": "hf", "connector": "mlp", "llm": "hf"}


@pytest.mark.parametrize("validate", [ModelConfig.from_dict, ModelConfig.model_validate])
def test_model_config_validates_the_yaml_shape(validate: Any, tokenizer_dir: str) -> None:
    data = tiny_model_config(tokenizer_dir)
    config = validate(data)
    assert isinstance(config, ModelConfig) and config.to_dict()["connector"] == {"type": "mlp"}
    bad = {**data, "connector": {"type": "mlp", "depht": 2}}
    with pytest.raises(ConfigError, match=r"^connector\.depht: unknown key") as info:
        validate(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"vision": {"type": "hf"}}, r"^missing section\(s\): connector, llm$"),
        (42, r"^config: expected a YAML path, a dict or a ModelConfig, got int$"),
        ("no/such.yaml", r"^no/such\.yaml: config file not found$"),
    ],
)
def test_load_config_errors_are_one_line(config: Any, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        vlm_adapters.load_config(config)


# export and merge_lora from the package root


def test_export_is_the_callable_export_package(
    tokenizer_dir: str, saved: Path, tmp_path: Path
) -> None:
    import vlm_adapters.export as package  # imported either way, it is the same object

    assert vlm_adapters.export is package and package.to_hf_llava is not None
    model = VisionLanguageModel.from_pretrained(saved)
    with pytest.raises(ExportError, match=r"^unknown export format 'gguf'; use one of: hf-llava$"):
        vlm_adapters.export(model, tmp_path / "x", format="gguf")
    out = vlm_adapters.export(model, tmp_path / "llava", format="hf-llava")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    back = vlm_adapters.load(out)
    torch.testing.assert_close(_logits(back), _logits(model), rtol=1e-4, atol=1e-4)


def test_merge_lora_is_public(saved: Path) -> None:
    model = VisionLanguageModel.from_pretrained(saved)
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert has_lora(model)
    assert vlm_adapters.merge_lora(model) is model and not has_lora(model)
    assert "merge_lora" in vlm_adapters.__all__ and "export" in dir(vlm_adapters)


# from_pretrained / load: dtype, device_map, revision


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_dtype_builds_every_component_in_it(saved: Path, dtype: Any, tmp_path: Path) -> None:
    model = VisionLanguageModel.from_pretrained(saved, dtype=dtype, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.llm.cfg.dtype == "bfloat16"  # recorded: a save reloads in bfloat16
    as_saved = vlm_adapters.load(saved, dtype="auto", device_map={"": "cpu"})
    assert {p.dtype for p in as_saved.parameters()} == {torch.float32}
    expected = _logits(as_saved.to(torch.bfloat16))
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dtype": "int8"}, r"^dtype='int8': use 'auto' .* one of float32, bfloat16"),
        ({"dtype": torch.int64}, r"^dtype=torch\.int64: use 'auto'"),
        ({"device_map": "balanced"}, r"^device_map='balanced': vlm-adapters places the whole"),
        ({"device_map": {"llm": 0, "vision": "cpu"}}, r"^device_map=\{'llm': 0, .*one device"),
        ({"device_map": "cuda:7"}, r"^device_map='cuda:7': this machine has \d+ CUDA device"),
    ],
)
def test_placement_refusals_are_one_line_before_loading(
    kwargs: dict[str, Any], pattern: str, tmp_path: Path
) -> None:
    missing = tmp_path / "nothing-here"  # refused before the checkpoint is even looked at
    with pytest.raises(ConfigError, match=pattern) as info:
        vlm_adapters.load(missing, **kwargs)
    assert "\n" not in str(info.value)


def test_device_map_auto_takes_the_first_accelerator_or_the_cpu(saved: Path) -> None:
    model = VisionLanguageModel.from_pretrained(saved, device_map="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}


def test_a_hub_id_is_downloaded_at_its_revision(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = vlm_adapters.load("someone/tiny-vlm", revision="v1.0")
    [(repo, kwargs)] = calls
    assert repo == "someone/tiny-vlm" and kwargs["revision"] == "v1.0"
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith((".bin", ".py", ".pt")) for p in kwargs["allow_patterns"])
    reference = VisionLanguageModel.from_pretrained(saved)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_hub_misses_and_local_revisions_are_one_line(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"revision='main' applies to hub ids"):
        VisionLanguageModel.from_pretrained(saved, revision="main")
    with pytest.raises(vlm_adapters.VLMError, match=r"'someone/absent'.*HF_HUB_OFFLINE") as info:
        vlm_adapters.load("someone/absent")
    assert "\n" not in str(info.value)
    nested = tmp_path / "runs" / "x" / "final"  # not a hub id: only "no such directory"
    with pytest.raises(CheckpointError, match=r"final: no such checkpoint directory$"):
        vlm_adapters.load(nested)


# the tokenizer and the LLM disagree


def _llama(vocab_size: int, eos: int | list[int] = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=eos,
    )
    return LlamaForCausalLM(config)


def test_a_matching_tokenizer_gives_no_warning(tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer_disagreements(tokenizer, _llama(len(tokenizer) + 8)) == []
    assert tokenizer_disagreements(tokenizer, _llama(len(tokenizer), eos=[7, 2])) == []


def test_more_tokens_than_embedding_rows_is_warned(tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    [problem] = tokenizer_disagreements(tokenizer, _llama(16))
    assert problem.startswith(f"{len(tokenizer)} tokens but the LLM has 16 embedding rows")


def test_an_eos_token_missing_or_not_the_llms_is_warned() -> None:
    tokenizer = build_word_tokenizer(shapes_vocabulary())
    tokenizer.chat_template = None
    [problem] = tokenizer_disagreements(tokenizer, _llama(len(tokenizer), eos=9))
    assert problem.startswith("its eos token '</s>' (id 2) is not the LLM's (eos_token_id [9])")
    tokenizer.eos_token = None
    [problem] = tokenizer_disagreements(tokenizer, _llama(len(tokenizer)))
    assert problem.startswith("no end-of-text (eos) token")


def test_chat_template_markers_that_are_not_single_tokens_are_warned() -> None:
    tokenizer = build_word_tokenizer(shapes_vocabulary())  # chatml template, no chatml tokens
    [problem] = tokenizer_disagreements(tokenizer, _llama(len(tokenizer)))
    assert problem.startswith("its chat template's markers <|im_start|>, <|im_end|> are not")


def test_a_word_vocabulary_read_as_subwords_is_warned_when_the_llm_is_built(
    tokenizer_dir: str, tmp_path: Path
) -> None:
    """The reported case: a word-level tokenizer saved beside a Qwen2 config, which
    transformers then reads as a Qwen2 (byte-level BPE) tokenizer."""
    directory = tmp_path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    section = tiny_model_config(str(directory), llm="qwen2")["llm"]
    with pytest.warns(TokenizerWarning) as record:
        get_registry().create("llm", section)
    messages = [str(w.message) for w in record]
    assert any("breaks words of its own vocabulary into characters or drops" in m for m in messages)
    assert all(m.startswith(f"llm tokenizer {str(directory)!r}: ") for m in messages)
