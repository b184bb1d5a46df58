"""Checkpoints hooked_vlm cannot load as they are get an error or a warning that names the problem."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from hooked_vlm import HookedVLM
from weights_conversion import detect_format


def _edited_copy(source, tmp_path, edit, name="config.json"):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    data = json.loads((copy / name).read_text())
    edit(data)
    (copy / name).write_text(json.dumps(data))
    return copy


def test_an_unsupported_architecture_lists_the_supported_ones():
    config = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}
    with pytest.raises(ValueError, match=r"unknown architecture: model_type='qwen2_5_vl'") as error:
        detect_format(config)
    for supported in ("LlavaForConditionalGeneration", "LlavaLlamaForCausalLM", "InternVLForConditionalGeneration", "InternVLChatModel"):
        assert supported in str(error.value)


@pytest.mark.parametrize("source", ["internvl_6b", "internvl_original"])
def test_the_gpt_oss_variant_is_named_and_refused(tiny_checkpoint, tmp_path, source):
    """InternVL3_5-GPT-OSS-20B-A4B-Preview: text_config / llm_config model_type gpt_oss."""

    def to_gpt_oss(config):
        (config.get("text_config") or config["llm_config"])["model_type"] = "gpt_oss"

    copy = _edited_copy(tiny_checkpoint(source), tmp_path, to_gpt_oss)
    with pytest.raises(NotImplementedError, match=r"InternVL3\.5-GPT-OSS checkpoint \(InternVL3_5-GPT-OSS-20B-A4B-Preview"):
        HookedVLM.from_pretrained(copy)


@pytest.mark.parametrize(("source", "assumed"), [
    ("llava_base", r"LLaVA checkpoint has no preprocessor_config\.json .* assuming the defaults: resize the shortest edge to 42 px, centre-crop 42x42"),
    ("internvl_300m", r"InternVL checkpoint has no preprocessor_config\.json .* assuming the defaults: 56x56 tiles, 1 to 12 tiles plus a thumbnail"),
])  # fmt: skip
def test_a_missing_image_processor_config_says_what_was_assumed(tiny_checkpoint, tmp_path, source, assumed):
    copy = _edited_copy(tiny_checkpoint(source), tmp_path, lambda processor: processor.pop("image_processor", None), "processor_config.json")
    (copy / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match=assumed):
        model = HookedVLM.from_pretrained(copy)
    with_config = HookedVLM.from_pretrained(tiny_checkpoint(source)).preprocessing
    # the tiny checkpoints' processors hold the defaults, but for InternVL's tile limit (6, not 12)
    assert model.preprocessing == (replace(with_config, max_tiles=12) if source.startswith("internvl") else with_config)


def test_an_original_internvl_conversation_template_that_is_not_implemented_is_named(tiny_checkpoint, tmp_path):
    copy = _edited_copy(tiny_checkpoint("internvl_original"), tmp_path, lambda config: config.update(template="Hermes-2"))
    with pytest.warns(UserWarning, match=r"conversation template 'Hermes-2' .* is not implemented; prepare\(\) uses the InternVL-HF chat template"):
        model = HookedVLM.from_pretrained(copy)
    assert model.preprocessing.template == "hf"
