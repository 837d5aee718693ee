"""Model loading and each checkpoint's published evaluation prompt (its *recipe*), behind one small interface.

Vocabulary: a model *family* is the structural spec the patches use (``llama``, ``llava_next``, ``idefics2``,
``qwen``, ``chatglm``: ``hallupatch.spec``); a *recipe* is how the published evaluation of a kind of checkpoint
loads and prompts it (``llava-hf``, ``llava``, ``llava-next-vicuna``, ``llava-next-mistral``, ``vipllava``,
``idefics2``, ``qwen-vl``, ``glm-4v``, ``qwen2-vl``, ``qwen2.5-vl``). The recipe-specific parts are data:
:data:`RECIPES` holds, per recipe, the conversation template, how the benchmark question is rewritten,
the image preprocessing and the generation length, each with the published source it follows. The
backends only turn a recipe into model inputs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from hallupatch.methods.two_branch import branch_call_inputs

from hallupatch.eval.data import Question
from hallupatch.eval.decoding import GREEDY, Decoding

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
YES_NO_SUFFIX = " Please answer yes or no."
_YES_NO_SUFFIX = re.compile(r"\s*Please answer yes or no\.\s*$")
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Recipe:
    """A kind of checkpoint's published evaluation recipe (``name``: its key in :data:`RECIPES`).

    ``template``: the full prompt, with ``{question}`` and (Qwen) ``{image}``; ``None`` = the
    tokenizer's own chat template. ``question_style``: ``"short_answer"`` (LLaVA-1.5: drop
    ``Please answer yes or no.``, append :data:`SHORT_ANSWER`), ``"yes_no"`` (end the question with
    :data:`YES_NO_SUFFIX`, as VLMEvalKit prompts Qwen2-VL) or ``"as_is"``. ``pad_to_square``: pad
    the image to a square with the processor's mean colour before preprocessing (LLaVA-1.5's
    ``image_aspect_ratio="pad"``). ``max_new_tokens``: ``None`` = the checkpoint's generation config.
    ``generate_defaults``: generation settings of the published evaluation that replace the checkpoint's
    own where the run leaves them unset (``(name, value)`` pairs).
    """

    name: str
    template: Optional[str]
    question_style: str
    pad_to_square: bool
    max_new_tokens: Optional[int]
    source: str
    generate_defaults: Tuple[Tuple[str, Any], ...] = ()


_VICUNA_V1 = VICUNA_V1_SYSTEM + " USER: <image>\n{question} ASSISTANT:"
# LLaVA's conv_mistral_instruct (llava-v1.6-mistral-7b): no system prompt, one [INST] turn
_MISTRAL_INSTRUCT = "[INST] <image>\n{question} [/INST]"
_VIP_LLAVA = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.###Human: <image>\n{question}###Assistant:"
)
# Idefics2's processor chat template for [{"role": "user", "content": [image, text]}] + the generation prompt
_IDEFICS2_CHAT = "User:<image>{question}<end_of_utterance>\nAssistant:"
RECIPES: Dict[str, Recipe] = {
    "llava-hf": Recipe(
        "llava-hf", _VICUNA_V1, "short_answer", True, 128,
        "LLaVA llava/eval/model_vqa_loader.py, --conv-mode vicuna_v1, --temperature 0 (scripts/v1_5/eval/mme.sh)",
    ),
    "llava": Recipe(
        "llava", _VICUNA_V1, "short_answer", True, 128,
        "as llava-hf, with the original repository's loader and tokenizer_image_token",
    ),
    "qwen-vl": Recipe(
        "qwen-vl",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<img>{image}</img>\n{question}<|im_end|>\n<|im_start|>assistant\n",
        "as_is", False, None,
        "Qwen-VL eval_mm/mme/eval.py: model.chat(query='<img>{path}</img>\\n{question}'), ChatML make_context",
    ),
    "glm-4v": Recipe(
        "glm-4v", None, "as_is", False, None,
        "GLM-4V-9b README: tokenizer.apply_chat_template([{'role': 'user', 'image': image, 'content': question}])",
    ),
    "llava-next-vicuna": Recipe(
        "llava-next-vicuna", _VICUNA_V1, "short_answer", False, 128,
        "LLaVA-NeXT (llava-v1.6-vicuna): LLaVA's model_vqa_loader.py with --conv-mode vicuna_v1 and the MME "
        "short-answer prompt, anyres images (image_aspect_ratio 'anyres', no square padding)",
    ),
    "llava-next-mistral": Recipe(
        "llava-next-mistral", _MISTRAL_INSTRUCT, "short_answer", False, 128,
        "LLaVA-NeXT (llava-v1.6-mistral-7b): LLaVA's conv_mistral_instruct ('[INST] <image>\\n... [/INST]', the "
        "llava-hf model card's prompt) with the MME short-answer prompt, anyres images",
    ),
    "vipllava": Recipe(
        "vipllava", _VIP_LLAVA, "short_answer", False, 128,
        "ViP-LLaVA: the llava-hf/vip-llava model card's template ('###Human: <image>\\n...###Assistant:', after "
        "the official code base) with LLaVA-1.5's MME short-answer prompt",
    ),
    "idefics2": Recipe(
        "idefics2", _IDEFICS2_CHAT, "short_answer", False, 128,
        "Idefics2: its processor's chat template (User:<image>...<end_of_utterance>\\nAssistant:) with lmms-eval's "
        "MME post-prompt ('\\nAnswer the question using a single word or phrase.')",
    ),
    "qwen2-vl": Recipe(
        "qwen2-vl", None, "yes_no", False, 128,
        "VLMEvalKit's Qwen2VLChat (vlmeval/vlm/qwen2_vl): the processor's chat template with one image then the "
        "question, ' Please answer yes or no.' on yes/no questions (MME's own questions carry it already), the "
        "checkpoint's min/max pixels, greedy (top_k 1), repetition_penalty 1.0 over the hub's 1.05",
        (("repetition_penalty", 1.0),),
    ),
    "qwen2.5-vl": Recipe(
        "qwen2.5-vl", None, "yes_no", False, 128,
        "as qwen2-vl (VLMEvalKit evaluates Qwen2.5-VL with the same Qwen2VLChat class and prompts)",
        (("repetition_penalty", 1.0),),
    ),
}
# recipes loaded through hallupatch's Qwen2-VL drop-in files (trust_remote_code under transformers 4.40)
QWEN2_VL_RECIPES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}
# recipes whose checkpoints load as one transformers class with its AutoProcessor: the class, and whether
# the processor takes one list of images per prompt (Idefics2) instead of one flat list
PROCESSOR_MODELS: Dict[str, Tuple[str, bool]] = {
    "llava-hf": ("LlavaForConditionalGeneration", False),
    "llava-next-vicuna": ("LlavaNextForConditionalGeneration", False),
    "llava-next-mistral": ("LlavaNextForConditionalGeneration", False),
    "vipllava": ("VipLlavaForConditionalGeneration", False),
    "idefics2": ("Idefics2ForConditionalGeneration", True),
}
# llava-v1.6-34b (Nous-Hermes-2-Yi-34B, ChatML) has a llama text config too; its Yi vocabulary tells it apart
_YI_VOCAB_SIZE = 64000


def rewrite_question(question: str, style: str) -> str:
    """The question as the recipe asks it (``short_answer``: LLaVA-1.5's MME/POPE rewrite)."""
    if style == "short_answer":
        return _YES_NO_SUFFIX.sub("", question.strip()) + SHORT_ANSWER
    if style == "yes_no":
        return _YES_NO_SUFFIX.sub("", question.strip()) + YES_NO_SUFFIX
    if style == "as_is":
        return question
    raise ValueError(f"unknown question_style {style!r}; use 'short_answer', 'yes_no' or 'as_is'")


def expand_to_square(image, background: Tuple[int, int, int]):
    """Pad a PIL image to a square, centred, with ``background`` (LLaVA-1.5's ``expand2square``)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def config_path(path: str) -> Path:
    """The ``config.json`` of ``--model``: in the folder, or for a hub name (``org/name``) from the cache or
    the hub; ``FileNotFoundError`` saying which is missing (the folder, or its config)."""
    config_file = Path(path) / "config.json"
    if not Path(path).exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            raise FileNotFoundError(f"--model {path} does not exist: give a checkpoint folder (save_pretrained layout)")
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(path, "config.json"))
        except Exception as err:  # offline, unknown repository, no access: the hub's many error types
            raise FileNotFoundError(f"--model {path} does not exist here, and the Hugging Face hub gave no model of "
                                    f"that name ({type(err).__name__}); give a checkpoint folder") from None
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {path}: --model must be a checkpoint folder (save_pretrained layout)")
    return config_file


def detect_recipe(path: str) -> str:
    """The recipe of a checkpoint folder, from its ``config.json``."""
    config_file = config_path(path)
    config = read_config(config_file)
    model_type = str(config.get("model_type", "")).lower()
    architectures = " ".join(config.get("architectures") or [])
    # the architecture first: the original LLaVA-1.5 checkpoints say model_type "llava" too
    if "LlavaNextForConditionalGeneration" in architectures or model_type == "llava_next":
        return _llava_next_recipe(path, config.get("text_config") or {})
    if "VipLlavaForConditionalGeneration" in architectures or model_type == "vipllava":
        return "vipllava"
    if "Idefics2ForConditionalGeneration" in architectures or model_type == "idefics2":
        return "idefics2"
    if "LlavaLlamaForCausalLM" in architectures or model_type == "llava_llama":
        return "llava"
    if "LlavaForConditionalGeneration" in architectures or model_type == "llava":
        return "llava-hf"
    if model_type == "qwen" or "QWenLMHeadModel" in architectures:
        return "qwen-vl"
    if model_type == "chatglm" or "ChatGLMForConditionalGeneration" in architectures:
        return "glm-4v"
    if model_type in QWEN2_VL_RECIPES:
        return QWEN2_VL_RECIPES[model_type]
    raise ValueError(
        f"cannot tell the model family and evaluation recipe of {path} (model_type={model_type!r}, architectures={architectures!r}); "
        f"pass --recipe, one of {sorted(RECIPES)}"
    )


def _llava_next_recipe(path: str, text_config: Dict[str, Any]) -> str:
    """LLaVA-NeXT's prompt follows its language model: Mistral-Instruct or Vicuna (llama)."""
    decoder = str(text_config.get("model_type", "llama")).lower()
    if decoder == "mistral":
        return "llava-next-mistral"
    if decoder == "llama" and text_config.get("vocab_size") != _YI_VOCAB_SIZE:
        return "llava-next-vicuna"
    raise ValueError(
        f"{path} is a LLaVA-NeXT checkpoint with a {decoder} decoder (vocabulary {text_config.get('vocab_size')}), "
        "whose prompt recipe hallupatch does not know (llava-v1.6-34b uses ChatML); recipes: "
        f"{sorted(RECIPES)} (pass --recipe to choose one)"
    )


def read_config(config_file: Path) -> Dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict; ``ValueError`` naming the file when it is not a JSON object."""
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): the checkpoint's config is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a model config (a JSON object)")
    return config


@contextlib.contextmanager
def loading(path: Union[str, Path]) -> Iterator[None]:
    """Errors while reading a checkpoint's files (damaged safetensors, a config or tokenizer file that is
    not JSON, a missing weight file) as one ``ValueError`` naming the checkpoint, never a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the checkpoint {path}: {first} ({type(err).__name__}); its files are "
                         "damaged or incomplete: save or download it again") from None


class Backend:
    """A loaded model with its recipe: ``generate(questions)`` returns one answer dict per question.

    Each answer has ``text`` (decoded, stripped, as LLaVA's evaluation writes it), ``prompt`` (the
    rewritten question) and ``new_tokens`` (tokens generated for that sample up to and including EOS).
    """


    def __init__(self, model, recipe: Recipe, name: str):
        self.model = model
        self.recipe = recipe
        self.name = name
        self.decoding: Decoding = GREEDY   # the run's generation settings (the CLI sets them)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, q: Question) -> str:
        return rewrite_question(q.question, self.recipe.question_style)

    def generate(self, questions: Sequence[Question], max_new_tokens: Optional[int]) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def batch_key(self, q: Question) -> Hashable:
        """Questions of one ``generate()`` call must share this key (the harness splits a batch by it,
        keeping the answers in question order); the default lets any questions share a batch."""
        return None

    def _decode(self, tokenizer, output: torch.Tensor, prompt_len: int, eos_ids: Sequence[int]) -> List[Tuple[str, int]]:
        new = output[:, prompt_len:]
        results = []
        for row in new.tolist():
            n = len(row)
            for i, tok in enumerate(row):
                if tok in eos_ids:
                    n = i + 1
                    break
            text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            results.append((text, n))
        return results


def _eos_ids(model, tokenizer) -> List[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


class LlavaHFBackend(Backend):
    """Checkpoints used through their transformers processor (:data:`PROCESSOR_MODELS`: llava-hf LLaVA-1.5,
    LLaVA-NeXT, VipLLaVA, Idefics2), left-padded batches. ``nested_images``: the processor takes one list of
    images per prompt (Idefics2)."""

    def __init__(self, model, processor, recipe: Recipe, name: str, nested_images: bool = False):
        super().__init__(model, recipe, name)
        self.processor = processor
        self.nested_images = nested_images
        self.processor.tokenizer.padding_side = "left"
        mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.background = tuple(int(x * 255) for x in mean)

    def _image(self, q: Question):
        image = q.load_image()
        return expand_to_square(image, self.background) if self.recipe.pad_to_square else image

    def batch_key(self, q: Question) -> Hashable:
        """LLaVA-NeXT (an image processor with ``image_grid_pinpoints``): the image size. Its anyres grid and
        unpadding give each size its own number of visual tokens, which transformers 4.40 can neither pad
        in the processor nor stack in the model, so images of one size share a batch."""
        if getattr(self.processor.image_processor, "image_grid_pinpoints", None) is None:
            return None
        return self._image(q).size

    def generate(self, questions, max_new_tokens):
        images = [self._image(q) for q in questions]
        texts = [self.recipe.template.format(question=self.prompt(q)) for q in questions]
        if self.nested_images:
            images = [[image] for image in images]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        tokenizer = self.processor.tokenizer
        encode = functools.partial(tokenizer, return_tensors="pt", padding=True)   # left-padded, as the prompts
        branch = {k: v.to(self.device) for k, v in branch_call_inputs(self.model, texts, encode).items()}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                **branch,
                **self.decoding.generate_kwargs(),
                max_new_tokens=max_new_tokens or self.recipe.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = self._decode(tokenizer, output, inputs["input_ids"].shape[1], _eos_ids(self.model, tokenizer))
        return [{"text": t, "new_tokens": n} for t, n in decoded]


class OriginalLlavaBackend(Backend):
    """Checkpoints of the original LLaVA repository (``llava`` package), one question at a time, as
    its ``model_vqa_loader`` runs them."""


    def __init__(self, model, tokenizer, image_processor, recipe: Recipe, name: str):
        import hallupatch

        # the unedited llava package's forward lacks the cache_position that transformers' generate passes
        super().__init__(hallupatch.make_generate_compatible(model), recipe, name)
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def generate(self, questions, max_new_tokens):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        answers = []
        for q in questions:
            image = q.load_image()
            prompt = self.recipe.template.format(question=self.prompt(q))
            ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
            pixels = process_images([image], self.image_processor, self.model.config).to(self.device, self.model.dtype)
            encode = functools.partial(_image_token_ids, self.tokenizer, tokenizer_image_token, IMAGE_TOKEN_INDEX)
            branch = {k: v.to(self.device) for k, v in branch_call_inputs(self.model, [prompt], encode).items()}
            with torch.inference_mode():
                output = self.model.generate(
                    ids.to(self.device), images=pixels, image_sizes=[image.size], **branch,
                    **self.decoding.generate_kwargs(),
                    max_new_tokens=max_new_tokens or self.recipe.max_new_tokens, use_cache=True,
                )
            # the original generate returns only the new tokens
            (text, n), = self._decode(self.tokenizer, output, 0, _eos_ids(self.model, self.tokenizer))
            answers.append({"text": text, "new_tokens": n})
        return answers


def _image_token_ids(tokenizer, tokenize, image_token: int, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The original LLaVA's tokenization of one prompt (its image placeholder as ``image_token``)."""
    (text,) = texts
    return {"input_ids": tokenize(text, tokenizer, image_token, return_tensors="pt")[None]}


class QwenVLBackend(Backend):
    """Qwen-VL-Chat (``trust_remote_code``): ChatML prompt with ``<img>path</img>``, left-padded batches."""

    def __init__(self, model, tokenizer, recipe: Recipe, name: str, image_dir: Path):
        super().__init__(model, recipe, name)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = getattr(tokenizer, "eod_id", None)
        self.image_dir = Path(image_dir)

    def _image_path(self, q: Question) -> str:
        if not callable(q.image):
            return str(Path(q.image).resolve())
        path = self.image_dir / (re.sub(r"[^\w.-]", "_", q.image_id) + ".png")
        if not path.exists():
            self.image_dir.mkdir(parents=True, exist_ok=True)
            q.load_image().save(path)
        return str(path.resolve())

    def generate(self, questions, max_new_tokens):
        texts = [self.recipe.template.format(image=self._image_path(q), question=self.prompt(q)) for q in questions]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        stop = [self.tokenizer.im_end_id, self.tokenizer.im_start_id, self.tokenizer.eod_id]
        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens or self.recipe.max_new_tokens else {}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, **self.decoding.generate_kwargs(), eos_token_id=stop, pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        decoded = self._decode(self.tokenizer, output, inputs["input_ids"].shape[1], stop)
        return [{"text": t, "new_tokens": n} for t, n in decoded]


class GLM4VBackend(Backend):
    """GLM-4V-9b (``trust_remote_code``): the tokenizer's chat template with the image, left-padded."""

    def __init__(self, model, tokenizer, recipe: Recipe, name: str):
        super().__init__(model, recipe, name)
        self.tokenizer = tokenizer

    def generate(self, questions, max_new_tokens):
        encoded = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "image": q.load_image(), "content": self.prompt(q)}],
                add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True,
            )
            for q in questions
        ]
        width = max(e["input_ids"].shape[1] for e in encoded)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = e["input_ids"].shape[1]
            ids[i, width - n:] = e["input_ids"][0]
            mask[i, width - n:] = 1
        images = torch.cat([e["images"] for e in encoded]).to(self.device, self.model.dtype)
        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), images=images,
                **self.decoding.generate_kwargs(), **kwargs,
            )
        decoded = self._decode(self.tokenizer, output, width, _eos_ids(self.model, self.tokenizer))
        return [{"text": t, "new_tokens": n} for t, n in decoded]


class Qwen2VLBackend(Backend):
    """Qwen2-VL / Qwen2.5-VL through hallupatch's drop-in files: the processor's chat template (one image, then
    the question), left-padded batches."""

    def __init__(self, model, processor, recipe: Recipe, name: str):
        super().__init__(model, recipe, name)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"

    def chat(self, question: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def generate(self, questions, max_new_tokens):
        texts = [self.chat(self.prompt(q)) for q in questions]
        images = [q.load_image() for q in questions]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs = dict(self.recipe.generate_defaults)
        kwargs.update(self.decoding.generate_kwargs())
        tokenizer = self.processor.tokenizer
        # a two-branch method's prompts (ICD's) through the processor with the same images: it expands each
        # <|image_pad|> to the image's token count, which the tokenizer alone would not
        def encode(prompts):
            return self.processor(text=prompts, images=images, return_tensors="pt", padding=True)

        branch = {k: v.to(self.device) for k, v in branch_call_inputs(self.model, texts, encode).items()}
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs, **branch, pad_token_id=tokenizer.pad_token_id,
                                         max_new_tokens=max_new_tokens or self.recipe.max_new_tokens)
        decoded = self._decode(tokenizer, output, inputs["input_ids"].shape[1], _eos_ids(self.model, tokenizer))
        return [{"text": t, "new_tokens": n} for t, n in decoded]


def load_qwen2_vl(path: str, torch_dtype: torch.dtype, device: str):
    """The model and processor of a Qwen2-VL / Qwen2.5-VL folder with hallupatch's drop-in files installed."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    if "AutoModelForVision2Seq" not in config.get("auto_map", {}):
        raise ValueError(f"{path} is a {config.get('model_type')} checkpoint, which transformers 4.40 cannot load by "
                         f"itself: run `python -m hallupatch.modeling install {path}` first (it adds the model files)")
    from transformers import AutoModelForVision2Seq, AutoProcessor

    model = AutoModelForVision2Seq.from_pretrained(path, trust_remote_code=True, torch_dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model.to(device).eval(), processor


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: Optional[str]) -> str:
    """``--device`` checked on this machine (``None``: cuda when available, else cpu); a device torch does
    not know or cannot use here is a ``ValueError`` saying what to pass instead."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} needs a CUDA GPU, but torch finds none on this machine: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...)")
    try:
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no data")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as err:
        raise ValueError(f"--device {name} cannot be used on this machine ({str(err).splitlines()[0]}): use cpu or cuda") from None
    return name


# Below this many parameters a CPU forward pass is too short for OpenMP's threads to pay off: on cores that
# other processes keep busy, a second thread spins at every barrier waiting for a core (the lab's main
# job took 14 min with torch's two threads on two busy cores, 1 min 42 s with one; eval/bench_threads.py).
SMALL_MODEL_PARAMETERS = 50_000_000
THREADS_HELP = ("CPU threads of the model (default: OMP_NUM_THREADS when set, else 1 for a small model on the CPU, "
                "where more threads only wait for busy cores, else one per core)")


def choose_threads(model: torch.nn.Module, requested: Optional[int] = None) -> str:
    """Set torch's intra-op threads for an evaluation and say how they were chosen.

    ``requested`` (``--threads``) wins; else the user's ``OMP_NUM_THREADS`` (which torch already read) is
    kept; else a small model (< :data:`SMALL_MODEL_PARAMETERS`) on the CPU runs on one thread, and any
    other model keeps torch's default (one per core). Returns e.g. ``"1 thread (small model on the CPU)"``.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1; got {requested}")
        torch.set_num_threads(requested)
        reason = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        reason = "OMP_NUM_THREADS"
    elif next(model.parameters()).device.type == "cpu" and \
            sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
        reason = "small model on the CPU; --threads N to change"
    else:
        reason = "torch's default"
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''} ({reason})"


def resolve_dtype(name: Optional[str], device: str) -> torch.dtype:
    if name is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    valid = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in valid:
        raise ValueError(f"--dtype must be one of {sorted(valid)}; got {name!r}")
    return valid[name]


class _DropSpecialTokensAdvice(logging.Filter):
    """Drops transformers' "Special tokens have been added in the vocabulary" advice, which every
    checkpoint with an added ``<image>`` token triggers at load time and no evaluation user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Special tokens have been added in the vocabulary")


@contextlib.contextmanager
def quiet_tokenizer_loading() -> Iterator[None]:
    """Load tokenizers in the block without the special-tokens advice (other messages pass)."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    advice = _DropSpecialTokensAdvice()
    logger.addFilter(advice)
    try:
        yield
    finally:
        logger.removeFilter(advice)


def load_backend(
    path: str, recipe: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
    work_dir: Optional[Path] = None,
) -> Backend:
    """Load a checkpoint folder with its recipe's loader and prompt (the recipe detected if ``None``)."""
    if recipe is not None and recipe not in RECIPES:
        from hallupatch.names import did_you_mean

        raise ValueError(f"unknown recipe {recipe!r}{did_you_mean(recipe, RECIPES)}; choose one of {sorted(RECIPES)}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if recipe is not None:   # a missing folder or a damaged config is named before any loader runs
        read_config(config_path(path))
    name = recipe or detect_recipe(path)
    recipe = RECIPES[name]
    checkpoint_name = Path(path).name
    with loading(path), quiet_tokenizer_loading():
        return _load(path, name, recipe, device, torch_dtype, checkpoint_name, work_dir)


def _load(path: str, name: str, recipe: Recipe, device: str, torch_dtype: torch.dtype, checkpoint_name: str,
          work_dir: Optional[Path]) -> Backend:
    """The backend of recipe ``name`` (see :func:`load_backend`)."""
    if name in PROCESSOR_MODELS:
        import transformers

        architecture, nested_images = PROCESSOR_MODELS[name]
        model_class = getattr(transformers, architecture)
        model = model_class.from_pretrained(path, torch_dtype=torch_dtype).to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(path)
        return LlavaHFBackend(model, processor, recipe, checkpoint_name, nested_images=nested_images)
    if name in QWEN2_VL_RECIPES.values():
        model, processor = load_qwen2_vl(path, torch_dtype, device)
        return Qwen2VLBackend(model, processor, recipe, checkpoint_name)
    if name == "llava":
        try:
            from llava.mm_utils import get_model_name_from_path
            from llava.model.builder import load_pretrained_model
        except ImportError:
            raise ImportError(
                f"{path} is a checkpoint of the original LLaVA repository, which needs its `llava` package: "
                "pip install git+https://github.com/haotian-liu/LLaVA (or use a llava-hf checkpoint, e.g. "
                "llava-hf/llava-1.5-7b-hf)"
            ) from None
        tokenizer, model, image_processor, _ = load_pretrained_model(
            path, None, get_model_name_from_path(path), device=device, torch_dtype=torch_dtype
        )
        return OriginalLlavaBackend(model.eval(), tokenizer, image_processor, recipe, checkpoint_name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch_dtype).to(device).eval()
    if name == "qwen-vl":
        return QwenVLBackend(model, tokenizer, recipe, checkpoint_name, Path(work_dir or ".") / "qwen_images")
    return GLM4VBackend(model, tokenizer, recipe, checkpoint_name)
