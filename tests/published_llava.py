"""The tiny LLaVA the published samplers were recorded on (``tests/published/record_baselines.py``), loaded in
transformers 4.40 as llava-hf's ``LlavaForConditionalGeneration``, and the recordings themselves.

The weights are stored in the original LLaVA repository's form (``LlavaLlamaForCausalLM``: ``model.*`` llama,
``model.mm_projector.{0,2}``, a separate CLIP folder), which is what the published code loads. Converting them
is a renaming: ``model.mm_projector.0/2`` -> ``multi_modal_projector.linear_1/2``, the llama under
``language_model.``, CLIP's ``vision_model`` under ``vision_tower.``. Both forms take CLIP's second-to-last
hidden state without its CLS row and a 2-layer GELU projector, so they compute the same logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel, LlavaConfig,
    LlavaForConditionalGeneration,
)

DATA = Path(__file__).resolve().parent / "data" / "published_baselines"
ORIGINAL_IMAGE_TOKEN = -200      # the original LLaVA repository's IMAGE_TOKEN_INDEX
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
              "pad_token_id", "tie_word_embeddings", "hidden_act")


def llava_hf_state_dict() -> dict:
    """The recorded weights under llava-hf's key names (the LM's stored rotary ``inv_freq`` buffers dropped)."""
    converted = {}
    for key, value in load_file(DATA / "llava" / "model.safetensors").items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.startswith("model.mm_projector."):
            index, rest = key[len("model.mm_projector."):].split(".", 1)
            converted[f"multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = value
        else:
            converted["language_model." + key] = value
    for key, value in load_file(DATA / "clip" / "model.safetensors").items():
        converted["vision_tower." + key] = value
    return converted


def llava_hf_config() -> LlavaConfig:
    original = json.loads((DATA / "llava" / "config.json").read_text())
    assert original["mm_projector_type"] == "mlp2x_gelu" and original["mm_vision_select_feature"] == "patch"
    text = LlamaConfig(**{k: original[k] for k in LLAMA_KEYS})
    vision = CLIPVisionConfig.from_pretrained(DATA / "clip")
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id(),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=original["mm_vision_select_layer"], pad_token_id=original["pad_token_id"],
    )


def image_token_id() -> int:
    vocab = json.loads((DATA / "llava" / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab["<image>"]


def load_llava_hf(folder: Path, attn_implementation: str = "eager") -> LlavaForConditionalGeneration:
    """Build the llava-hf model from the recorded weights, save it to ``folder`` and load it back."""
    model = LlavaForConditionalGeneration(llava_hf_config())
    missing, unexpected = model.load_state_dict(llava_hf_state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation).eval()


# ------------------------------------------------------------------------------------------------------------
# the original LLaVA repository's class, as the published samplers call it
class StandInCLIPVisionTower(nn.Module):
    """Like the original ``CLIPVisionTower``: a ``CLIPVisionModel`` at ``.vision_tower``, features = the hidden
    state ``mm_vision_select_layer`` without its CLS row."""

    def __init__(self, config):
        super().__init__()
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**config.vision_config))
        self.select_layer = config.mm_vision_select_layer

    def forward(self, images):
        hidden = self.vision_tower(images.to(self.vision_tower.dtype), output_hidden_states=True).hidden_states
        return hidden[self.select_layer][:, 1:].to(images.dtype)


class StandInLlavaLlamaModel(LlamaModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = StandInCLIPVisionTower(config)
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))


class StandInLlavaLlamaForCausalLM(LlamaForCausalLM):
    """The LLaVA-1.5 ``LlavaLlamaForCausalLM`` that VCD, ICD, AvisC and PAI ship, with the same interface:
    ``forward(..., images=)`` splices the projected image features in place of each ``-200`` token at the
    prefill (a row without one is embedded as text, the mask is extended with ones on the left) and, at a
    one-token step with ``images`` given, rebuilds the mask as ones over the cache; ``prepare_inputs_for_generation``
    carries ``images`` into every step. Its ``forward`` takes no ``cache_position`` (hallupatch's compatibility
    layer handles that, as for the stock class)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = StandInLlavaLlamaModel(config)
        self.post_init()

    def get_model(self):
        return self.model

    def _splice(self, input_ids, attention_mask, images):
        features = self.model.mm_projector(self.model.vision_tower(images))
        rows, image = [], 0
        for ids in input_ids:
            at = (ids == ORIGINAL_IMAGE_TOKEN).nonzero()
            embeds = self.model.embed_tokens(ids.clamp(min=0))
            if len(at):
                embeds = torch.cat([embeds[:at[0, 0]], features[image], embeds[at[0, 0] + 1:]])
                image += 1
            rows.append(embeds)
        width = max(len(r) for r in rows)
        assert all(len(r) == width for r in rows), "stand-in: rows of equal length only"
        embeds = torch.stack(rows)
        if attention_mask is not None:
            grow = width - input_ids.shape[1]
            attention_mask = torch.cat([attention_mask.new_ones((attention_mask.shape[0], grow)), attention_mask], 1)
        return embeds, attention_mask

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, images=None, return_dict=None):
        if images is not None and input_ids is not None and input_ids.shape[1] > 1:
            inputs_embeds, attention_mask = self._splice(input_ids, attention_mask, images)
            input_ids = None
        elif images is not None and past_key_values is not None and attention_mask is not None:
            past = past_key_values[-1][-1].shape[-2]
            attention_mask = attention_mask.new_ones((attention_mask.shape[0], past + 1))
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      **kwargs):
        if past_key_values:
            input_ids = input_ids[:, -1:]
        if inputs_embeds is not None and past_key_values is None:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            inputs = {"input_ids": input_ids}
        inputs.update(past_key_values=past_key_values, use_cache=kwargs.get("use_cache"),
                      attention_mask=attention_mask, images=kwargs.get("images"))
        return inputs


def load_original(folder: Path, attn_implementation: str = "eager") -> StandInLlavaLlamaForCausalLM:
    """The recorded weights as they are stored (the original form), CLIP under ``model.vision_tower.vision_tower``;
    saved to ``folder`` and loaded back."""
    original = json.loads((DATA / "llava" / "config.json").read_text())
    config = LlamaConfig(**{k: original[k] for k in LLAMA_KEYS}, mm_hidden_size=original["mm_hidden_size"],
                         mm_vision_select_layer=original["mm_vision_select_layer"],
                         vision_config=CLIPVisionConfig.from_pretrained(DATA / "clip").to_dict())
    model = StandInLlavaLlamaForCausalLM(config)
    weights = {k: v for k, v in load_file(DATA / "llava" / "model.safetensors").items()
               if not k.endswith("rotary_emb.inv_freq")}
    weights.update({"model.vision_tower.vision_tower." + k: v
                    for k, v in load_file(DATA / "clip" / "model.safetensors").items()})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return StandInLlavaLlamaForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation).eval()


def recording(method: str) -> dict:
    return torch.load(DATA / f"{method}.pt")


def images() -> dict:
    return torch.load(DATA / "images.pt")


def hf_ids(ids: torch.Tensor) -> torch.Tensor:
    """Original-form ids (image at -200) as llava-hf ids (the image token)."""
    return torch.where(ids == ORIGINAL_IMAGE_TOKEN, torch.full_like(ids, image_token_id()), ids)
