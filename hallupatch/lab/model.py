"""The lab model: a real llava-hf ``LlavaForConditionalGeneration`` (CLIP vision tower + LLaMA decoder)
and its ``LlavaProcessor``, small enough to train on two CPU cores and to ship inside the package."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from hallupatch.lab.text import build_tokenizer
from hallupatch.lab.world import IMAGE_SIZE

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
#: every lab checkpoint shipped in the package, by training seed (the default model is seed 0's); each
#: folder has a model card listing its files' sha256 (``hallupatch.lab.card``), which the tests check
SEEDS_DIR = Path(__file__).resolve().parent / "seeds"
SHIPPED_CHECKPOINTS: Dict[int, Path] = {0: CHECKPOINT_DIR, 1: SEEDS_DIR / "seed1", 2: SEEDS_DIR / "seed2"}
PATCH_SIZE = 8
VISION_HIDDEN = 96
VISION_LAYERS = 3
TEXT_HIDDEN = 128
TEXT_LAYERS = 6


def build_processor():
    """The lab's ``LlavaProcessor``: the word-level tokenizer and a 64 px ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_model(processor, seed: int = 0):
    """A freshly initialised lab ``LlavaForConditionalGeneration`` (same ``seed``, same weights).

    The config sets ``pad_token_id`` as llava-hf checkpoints do (transformers 4.40 needs it to find
    left padding at decoding steps) and reads the vision tower's last layer (64 patch tokens).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=4 * VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION_HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
        # Token embeddings start at std 0.5 (transformers' LLaMA init is 0.02): the projected image tokens
        # (rms ~0.14) then do not swamp a word's own identity in the residual stream, which kept the model
        # from reading the asked object. Also, transformers 4.40's llava merge finds image slots as all-zero
        # embeddings, so the pad row must not be zero (nn.Embedding's padding_idx init); padding_idx keeps
        # its gradient at zero, so it never changes.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.5)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_checkpoint(model, processor, path: Union[str, Path]) -> Path:
    """Save ``model`` in float16 safetensors plus the processor files (a ``from_pretrained`` folder)."""
    import copy

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.config.torch_dtype = torch.float16
    half.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


LAB_NEEDS = ("the lab needs a llava-hf LlavaForConditionalGeneration checkpoint (LLaMA decoder, CLIP vision tower) "
             "with the lab's word-level tokenizer, as `python -m hallupatch.lab train --out DIR` writes; to evaluate "
             "another model, run a benchmark on it: python -m hallupatch.eval pope --model PATH --data ...")


def check_lab_checkpoint(folder: Path) -> None:
    """Refuse (``FileNotFoundError`` / ``ValueError`` saying what the lab needs) a folder that is not a lab
    checkpoint, from its ``config.json``, before any weight is read."""
    from hallupatch.eval.models import read_config

    config_file = folder / "config.json"
    if not folder.exists():
        raise FileNotFoundError(f"no lab checkpoint in {folder}: the folder does not exist; train one with "
                                "`python -m hallupatch.lab train --out DIR` and pass that folder")
    if not config_file.is_file():
        raise FileNotFoundError(f"no lab checkpoint in {folder} (expected config.json and model.safetensors); "
                                "train one with `python -m hallupatch.lab train --out DIR` and pass that folder")
    config = read_config(config_file)
    architectures = config.get("architectures") or []
    text_type = (config.get("text_config") or {}).get("model_type", "llama")
    if config.get("model_type") != "llava" or "LlavaForConditionalGeneration" not in architectures or text_type != "llama":
        raise ValueError(f"{folder} is not a lab checkpoint (model_type {config.get('model_type')!r}, architectures "
                         f"{architectures}, decoder {text_type!r}): {LAB_NEEDS}")


def load_lab_model(path: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32) -> Tuple[object, object]:
    """``(model, processor)`` of the lab checkpoint: the one shipped in the package by default, or the
    folder ``path`` (e.g. written by ``python -m hallupatch.lab train``). Offline; eval mode; weights
    stored in float16 are computed in ``dtype`` (float32 by default, the fast choice on CPU). A folder
    that is not a lab checkpoint (another architecture, another tokenizer) is refused, saying what the
    lab needs."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hallupatch.eval.models import loading

    folder = Path(path) if path is not None else CHECKPOINT_DIR
    check_lab_checkpoint(folder)
    with loading(folder):
        processor = AutoProcessor.from_pretrained(folder)
        if processor.tokenizer.get_vocab() != build_tokenizer().get_vocab():
            raise ValueError(f"{folder} is a LLaVA checkpoint with another tokenizer than the lab's: {LAB_NEEDS}")
        model = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype, attn_implementation="eager")
    return model.eval(), processor
