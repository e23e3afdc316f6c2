"""Real loading code on checkpoints saved to a temp dir with save_pretrained (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import vlm_adapters
from vlm_adapters.plugins import get_registry
from vlm_adapters.testing import IMAGE_SIZE, tiny_connector_config

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # not CLIP's defaults: must come from the file


def _save_processor(directory: Path) -> None:
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = CLIPImageProcessor(image_mean=MEAN, image_std=STD, size=size, crop_size=crop)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("clip_vision")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(directory)
    _save_processor(directory)
    return directory


def test_hf_vision_loads_a_saved_clip_vision_model(clip_vision_dir: Path) -> None:
    backbone = get_registry().create("vision", {"type": "hf", "model": str(clip_vision_dir)})
    saved = CLIPVisionModel.from_pretrained(clip_vision_dir)
    assert backbone.transform.mean == pytest.approx(MEAN)
    assert backbone.transform.std == pytest.approx(STD)
    assert backbone.num_patches == 16 and backbone.num_prefix == 1
    for name, tensor in saved.state_dict().items():
        assert torch.equal(backbone.tower.state_dict()[name], tensor), name


def test_hf_vision_takes_the_vision_tower_of_a_full_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config={**text, "vocab_size": 50}))
    clip.save_pretrained(tmp_path)
    _save_processor(tmp_path)
    backbone = get_registry().create("vision", {"type": "hf", "model": str(tmp_path)})
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(backbone(pixels), expected, rtol=0, atol=0)
    assert backbone.transform.mean == pytest.approx(MEAN)


def _tokenizer_without_pad(directory: Path) -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>", "a", "red", "circle", "blue", "square", "what", "is", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = _tokenizer_without_pad(directory)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),  # no room: image and pad tokens force a resize
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_hf_llm_loads_a_saved_causal_lm_and_adds_tokens(llama_dir: Path) -> None:
    saved = LlamaForCausalLM.from_pretrained(llama_dir)
    old_vocab = saved.config.vocab_size
    llm = get_registry().create("llm", {"type": "hf", "model": str(llama_dir)})
    tokenizer = llm.tokenizer
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id is not None
    assert llm.image_token_id == tokenizer.convert_tokens_to_ids("<image>") >= old_vocab
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [llm.image_token_id]
    embeddings = llm.model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer) == old_vocab + 2
    assert llm.model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.equal(embeddings[:old_vocab], saved.get_input_embeddings().weight)
    assert llm.model.config.pad_token_id == tokenizer.pad_token_id


def test_saved_checkpoints_compose_into_a_vlm(
    clip_vision_dir: Path, llama_dir: Path, tmp_path: Path
) -> None:
    config = {
        "vision": {"type": "hf", "model": str(clip_vision_dir)},
        "connector": tiny_connector_config("mlp"),
        "llm": {"type": "hf", "model": str(llama_dir)},
    }
    model = vlm_adapters.build_vlm(config).eval()
    batch = model.processor(["<image> what is a red circle"], [Image.new("RGB", (40, 40))])
    model.save_pretrained(tmp_path / "vlm")
    loaded = vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.vision.transform.mean == pytest.approx(MEAN)
    assert loaded.tokenizer.pad_token == "<pad>"
