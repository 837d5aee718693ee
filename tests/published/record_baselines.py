"""Record what the PUBLISHED VCD, ICD, M3ID and PAI samplers compute on tiny LLaVA weights (issue 18 §7).

This script never runs under hallupatch's pinned transformers 4.40: it runs the published code itself, each in
the transformers its repository pins, and writes small recordings that ``tests/test_published_baselines.py``
compares hallupatch against.

Published code (fetched GitHub snapshots, extracted outside this repository; nothing of it is committed here):

=========  ==============================================  =========================================  ==============
method     repository @ commit                             what is used                               venv
=========  ==============================================  =========================================  ==============
VCD        DAMO-NLP-SG/VCD @ d6568ff81b8f (2024-10-07)     vcd_utils/, experiments/llava              /work/venvs/vcd
ICD        p1k0pan/ICD @ 2fa44c5786a1 (2024-10-06)         icd_utils/icd_sample_llava.py,             /work/venvs/vcd
                                                           experiments/llava (llava_custom template)
M3ID       sangminwoo/AvisC @ 772eba499dcb (2024-07-21)    avisc_utils/avisc_sample.py, experiments/llava  /work/venvs/vcd
PAI        LALBJ/PAI @ 9bbd8bd57a0b (2024-11-06)           attention.py, CFG.py, constants.py, llava/      /work/venvs/pai
=========  ==============================================  =========================================  ==============

Venvs (python 3.11, CPU):
  /work/venvs/vcd: torch==2.13.0 (local CPU wheel), transformers==4.31.0 (VCD's and AvisC's pin), einops,
                   safetensors, pillow.  ICD pins transformers 4.42.3, where its LLaVA path cannot run (its
                   ``evolve_iccd_sampling`` only replaces ``GenerationMixin.sample`` while 4.42 calls ``_sample``,
                   and the original LLaVA class lacks ``cache_position``), so ICD is recorded on 4.31 like VCD,
                   whose sampler it copies.
  /work/venvs/pai: torch==2.13.0, transformers==4.37.0 (PAI's pin), einops, safetensors, pillow.
  (The published environments use torch 2.0.1 / 2.3.1 on GPU in float16; here everything is float32 on CPU.)

Making them (nothing here builds or fetches the published code; these are the commands that were used):
  python3 -m venv /work/venvs/vcd && /work/venvs/vcd/bin/pip install torch==2.13.0 transformers==4.31.0 \
      einops safetensors pillow
  python3 -m venv /work/venvs/pai && /work/venvs/pai/bin/pip install torch==2.13.0 transformers==4.37.0 \
      einops safetensors pillow
  Source trees: the .py/.sh/.md/.yml files of each snapshot at the commit above, written out with ``git show``
  into /work/venvs/src/{VCD,ICD,AvisC,PAI} (unedited; the scripts run from this file, not from the repos).

How to run (from the repository root, OMP_NUM_THREADS=1):
  /work/venvs/vcd/bin/python tests/published/record_baselines.py build --src /work/venvs/src/VCD
  /work/venvs/vcd/bin/python tests/published/record_baselines.py vcd  --src /work/venvs/src/VCD
  /work/venvs/vcd/bin/python tests/published/record_baselines.py icd  --src /work/venvs/src/ICD
  /work/venvs/vcd/bin/python tests/published/record_baselines.py m3id --src /work/venvs/src/AvisC
  /work/venvs/pai/bin/python tests/published/record_baselines.py pai  --src /work/venvs/src/PAI

``build`` writes the tiny weights (fixed seed) in the ORIGINAL LLaVA repository's form, which the published code
loads: ``tests/data/published_baselines/llava/`` (``LlavaLlamaForCausalLM``: llama + ``model.mm_projector``,
``mm_vision_tower`` pointing at ``clip/``), ``clip/`` (a tiny ``CLIPVisionModel`` and its image processor) and a
word-level tokenizer, plus ``images.pt`` (the normalised pixel tensors). The hallupatch test loads the same
tensors as llava-hf's ``LlavaForConditionalGeneration`` and in a stand-in of the original class
(``tests/published_llava.py``).
Each method then writes ``tests/data/published_baselines/<method>.pt``: a dict with ``meta`` (repository, commit,
transformers version, call form) and ``runs`` (one dict per generate call: knobs as the published code names them,
the generate arguments, the seed, the inputs, the generated ``sequences``, the ``scores`` the published sampler
returns, and per step the main and second-branch raw last-position logits and the contrasted logits).

Rerunning every command reproduces every committed file byte for byte (checked). Only published functions
compute the recorded numbers. The script adds two things (each file's ``meta["instrumentation"]`` says so):
a ``LogitsProcessor`` appended after the published processors that copies its input (the contrasted logits, or
PAI's processor output), and a forward hook on ``lm_head`` that copies the last-position logits of each forward.
VCD's/ICD's/AvisC's samplers return ``SampleDecoderOnlyOutput`` without importing it (a NameError with
``return_dict_in_generate=True``); the script defines that name in the sampler's module so the scores can be read.
PAI's ``llava/model/multimodal_encoder/clip_encoder.py`` imports EVA-CLIP/InternViT modules needing timm,
flash_attn, peft and torchvision; empty stand-ins are registered for them (the tiny model uses the CLIP path).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "published_baselines"
LLAVA_DIR = DATA / "llava"
CLIP_DIR = DATA / "clip"

COMMITS = {
    "vcd": ("DAMO-NLP-SG/VCD", "d6568ff81b8fd306a49e630df44f2db5c2300191"),
    "icd": ("p1k0pan/ICD", "2fa44c5786a14dd902d8966303b7df073ac110ab"),
    "m3id": ("sangminwoo/AvisC", "772eba499dcbda0eaaf844fda2fdf5057dcd0175"),
    "pai": ("LALBJ/PAI", "9bbd8bd57a0b0923f996197e4bd3e02cc10b8d58"),
}

# ---------------------------------------------------------------------------------------------------------------
# tiny weights
VOCAB_SIZE = 128
IMAGE_TOKEN_ID = VOCAB_SIZE - 1   # the llava-hf form's image token; the original form uses -200 in input_ids
IMAGE_SIZE, PATCH = 16, 4         # 16 image tokens
SEED = 0

# Every text the recorded prompts contain (LLaVA's llava_v1 system prompt, PAI's SYSTEM_MESSAGE, ICD's five
# disturbance instructions, the eval scripts' format suffixes, the questions), so the word-level tokenizer knows them.
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
    " Please answer this question with one word. Please only answer yes or no.",
    "USER: ASSISTANT: Is there a dog in the image? What color is the car? Describe this image in detail.",
    "Answer the question using a single word or phrase.",
]
QUESTIONS = ["Is there a dog in the image?", "Describe this image in detail."]


def word_vocab() -> dict:
    import re
    words = []
    for text in CORPUS:
        for w in re.findall(r"\w+|[^\w\s]+", text):
            if w not in words:
                words.append(w)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab[w] = len(vocab)
    assert len(vocab) < IMAGE_TOKEN_ID, len(vocab)
    while len(vocab) < IMAGE_TOKEN_ID:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN_ID
    return vocab


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=word_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _init_(model, seed):
    """Weights ~ N(0, 1/fan_in) (logits of order 1, images that matter); norms near 1; small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "norm" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build(args):
    """Original-LLaVA-form tiny weights from VCD's classes (transformers 4.31)."""
    sys.path.insert(0, str(Path(args.src) / "experiments"))
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH, projection_dim=16,
    ))
    _init_(clip, SEED + 1)
    clip.save_pretrained(CLIP_DIR, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(CLIP_DIR)

    config = LlavaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
        mm_vision_tower="clip", mm_hidden_size=16, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        image_aspect_ratio="pad", use_mm_proj=True,
    )
    config.mm_vision_tower = str(CLIP_DIR)
    model = LlavaLlamaForCausalLM(config)
    _init_(model, SEED)
    config.mm_vision_tower = "clip"     # relative to the llava folder's parent; made absolute when loaded
    model.save_pretrained(LLAVA_DIR, safe_serialization=True)
    build_tokenizer().save_pretrained(LLAVA_DIR)
    # pixel tensors (the NORMALISED tensor the published scripts pass as ``images``), fixed seeds
    images = {f"image{i}": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(100 + i))
              for i in range(2)}
    torch.save(images, DATA / "images.pt")
    print("wrote", sorted(p.name for p in DATA.rglob("*") if p.is_file()))


# ---------------------------------------------------------------------------------------------------------------
# loading and recording helpers (run inside the published code's venv)
def load_original_llava(cls):
    from transformers import AutoConfig
    config = cls.config_class.from_pretrained(LLAVA_DIR)
    config.mm_vision_tower = str(CLIP_DIR)
    kwargs = {"attn_implementation": "eager"} if _tf_version() >= (4, 36) else {}
    model = cls.from_pretrained(LLAVA_DIR, config=config, **kwargs).eval()
    model.get_model().get_vision_tower().load_model()   # what llava.model.builder.load_pretrained_model does
    return model


def _tf_version():
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(LLAVA_DIR)


class CopyInput:
    """A LogitsProcessor appended after the published ones: copies what it receives, changes nothing."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.detach().clone().float())
        return scores


class LastLogits:
    """Forward hook on lm_head: the last-position logits of every forward, in call order."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.seen.append(output[:, -1, :].detach().clone().float())


def run_generate(model, seed, pre_draw, call, knobs, **extra):
    """set_seed(seed) as the published eval scripts do once per run; ``pre_draw()`` (VCD's noise) runs after it
    and before generate, exactly as there; then one ``model.generate(**call)``."""
    from transformers import LogitsProcessorList, set_seed

    set_seed(seed)
    drawn = pre_draw() if pre_draw is not None else {}
    copy = CopyInput()
    hook = LastLogits(model)
    procs = list(call.pop("logits_processor", [])) + [copy]
    try:
        with torch.inference_mode():
            out = model.generate(**call, **drawn, logits_processor=LogitsProcessorList(procs),
                                 return_dict_in_generate=True, output_scores=True)
    finally:
        hook.handle.remove()
    return out, copy.seen, hook.seen, drawn


def tensors_only(d):
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in d.items()}


def save(method, meta, runs):
    meta = dict(meta, repository=COMMITS[method][0], commit=COMMITS[method][1],
                transformers=str(__import__("transformers").__version__), torch=str(torch.__version__), dtype="float32",
                device="cpu", recorded_by="tests/published/record_baselines.py",
                instrumentation="a LogitsProcessor appended after the published ones copies its input (contrasted / "
                                "processed); a forward hook on lm_head copies each forward's last-position logits; "
                                "SampleDecoderOnlyOutput defined in the sampler module (published NameError)")
    torch.save({"meta": meta, "runs": runs}, DATA / f"{method}.pt")
    print(f"{method}: {len(runs)} runs -> {DATA / (method + '.pt')}")
    for r in runs:
        gen = r["sequences"][0, r["input_ids"].shape[1]:].tolist()
        print(f"  {r['name']:<40} {gen}")


def llava_v1_prompt(conv_templates, question, suffix=""):
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question + suffix)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def split_steps(seen, per_step):
    """lm_head copies in call order -> per branch lists (main first, then the second branch, each step)."""
    return [seen[i::per_step] for i in range(per_step)]


# ---------------------------------------------------------------------------------------------------------------
def record_vcd(args):
    src = Path(args.src)
    sys.path[:0] = [str(src), str(src / "experiments")]
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from vcd_utils import vcd_sample
    from vcd_utils.vcd_add_noise import add_diffusion_noise
    from transformers.generation.utils import SampleDecoderOnlyOutput

    vcd_sample.SampleDecoderOnlyOutput = SampleDecoderOnlyOutput  # published NameError (vcd_sample.py:240)
    vcd_sample.evolve_vcd_sampling()

    model = load_original_llava(LlavaLlamaForCausalLM)
    tok = load_tokenizer()
    images = torch.load(DATA / "images.pt")
    runs = []

    def vcd_run(name, question, image, seed, noise_step=500, gen=None, cd_alpha=1.0, cd_beta=0.1,
                suffix=" Please answer this question with one word.", pass_alpha=True):
        prompt = llava_v1_prompt(conv_templates, question, suffix)
        ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
        image_tensor = images[image]

        def draw():   # object_hallucination_vqa_llava.py:59-60, after set_seed(args.seed) (line 121)
            return {"images_cd": add_diffusion_noise(image_tensor, noise_step).unsqueeze(0)}

        call = dict(inputs=ids, images=image_tensor.unsqueeze(0), cd_beta=cd_beta, use_cache=True,
                    **(gen or dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=8)))
        if pass_alpha:
            call["cd_alpha"] = cd_alpha
        knobs = dict(alpha=cd_alpha if pass_alpha else 0.5, beta=cd_beta, noise_step=noise_step)
        out, contrasted, last, drawn = run_generate(model, seed, draw, dict(call), knobs)
        main, branch = split_steps(last, 2)
        runs.append(dict(
            name=name, method="vcd", knobs=knobs, seed=seed, prompt=prompt, input_ids=ids, image=image,
            images_cd=drawn["images_cd"], generate_kwargs={k: v for k, v in call.items()
                                                           if k not in ("inputs", "images")},
            sequences=out.sequences, scores=torch.stack(out.scores, 1).float(),
            contrasted=torch.stack(contrasted, 1), main_logits=torch.stack(main, 1),
            branch_logits=torch.stack(branch, 1),
        ))

    q0, q1 = QUESTIONS
    greedy = dict(do_sample=True, top_k=1, max_new_tokens=8)
    vcd_run("greedy_topk1_a1_b0.1_s500", q0, "image0", 55, gen=greedy)
    vcd_run("greedy_topk1_a1_b0_s500", q0, "image0", 55, gen=greedy, cd_beta=0.0)
    vcd_run("greedy_topk1_a2.5_b0.2_s999", q1, "image1", 3, noise_step=999, gen=greedy, cd_alpha=2.5, cd_beta=0.2)
    vcd_run("greedy_topk1_a0.5_b0.1_s200", q1, "image0", 7, noise_step=200, gen=greedy, cd_alpha=0.5)
    vcd_run("sample_script_defaults_seed55", q0, "image0", 55)          # temperature 1, top_p 1, top_k 50 (config)
    vcd_run("sample_script_defaults_seed42", q1, "image1", 42)
    vcd_run("sample_b0_seed42", q1, "image1", 42, cd_beta=0.0)
    vcd_run("sample_alpha_fallback_0.5_seed1", q0, "image1", 1, pass_alpha=False)  # cd_alpha not passed: 0.5
    vcd_run("sample_t0.7_topk5_topp0.9_a1.5_seed9", q1, "image0", 9, cd_alpha=1.5,
            gen=dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8))
    try:   # the -200 image token stays in input_ids: RepetitionPenaltyLogitsProcessor's gather fails
        vcd_run("sample_reppen1.3_seed5", q1, "image1", 5,
                gen=dict(do_sample=True, repetition_penalty=1.3, max_new_tokens=8))
        raise AssertionError("repetition_penalty was expected to fail on the original LLaVA class")
    except RuntimeError as err:
        repetition_penalty_error = str(err)

    # do_sample=False goes to transformers' greedy_search: images_cd, cd_alpha and cd_beta are ignored
    prompt = llava_v1_prompt(conv_templates, q0, " Please answer this question with one word.")
    ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
    img = images["image0"].unsqueeze(0)
    with torch.inference_mode():
        plain = model.generate(ids, images=img, do_sample=False, max_new_tokens=8)
        dropped = model.generate(ids, images=img, images_cd=add_diffusion_noise(images["image0"], 500).unsqueeze(0),
                                 cd_alpha=1.0, cd_beta=0.1, do_sample=False, max_new_tokens=8)
    assert torch.equal(plain, dropped), "VCD's do_sample=False should silently be vanilla greedy"
    # the eval script's loop: ONE set_seed for the whole run (object_hallucination_vqa_llava.py:121), then per
    # question the noise draw and the sampling draws; later questions' noise depends on earlier questions' draws
    from transformers import set_seed
    set_seed(55)
    loop = []
    for question, image in ((q0, "image1"), (q1, "image0"), (q0, "image0")):
        prompt = llava_v1_prompt(conv_templates, question, " Please answer this question with one word.")
        ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
        images_cd = add_diffusion_noise(images[image], 500).unsqueeze(0)
        with torch.inference_mode():
            seq = model.generate(ids, images=images[image].unsqueeze(0), images_cd=images_cd, cd_alpha=1.0,
                                 cd_beta=0.1, do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
                                 max_new_tokens=8, use_cache=True)
        loop.append(dict(input_ids=ids, image=image, images_cd=images_cd, sequences=seq))
    meta = dict(script_loop=dict(seed=55, knobs=dict(alpha=1.0, beta=0.1, noise_step=500),
                                 generate_kwargs=dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
                                                      max_new_tokens=8), questions=loop),
                call_form="generate(input_ids, images=, images_cd=add_diffusion_noise(image, noise_step), cd_alpha=, "
                          "cd_beta=, do_sample=True, ...) after transformers.set_seed(seed)",
                do_sample_false_is_vanilla=dict(input_ids=ids, image="image0", sequences=dropped),
                repetition_penalty_error=repetition_penalty_error)
    save("vcd", meta, runs)


def record_icd(args):
    src = Path(args.src)
    sys.path[:0] = [str(src), str(src / "experiments")]
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from icd_utils import icd_sample_llava
    from transformers.generation.utils import SampleDecoderOnlyOutput

    # icd_llava_pope.py:18 imports evolve_icd_sampling, which icd_sample_llava.py does not define (ImportError);
    # the module's function is evolve_iccd_sampling (icd_sample_llava.py:275).
    assert not hasattr(icd_sample_llava, "evolve_icd_sampling")
    icd_sample_llava.SampleDecoderOnlyOutput = SampleDecoderOnlyOutput  # published NameError (line 265)
    icd_sample_llava.evolve_iccd_sampling()

    model = load_original_llava(LlavaLlamaForCausalLM)
    tok = load_tokenizer()
    images = torch.load(DATA / "images.pt")
    instructions = [  # icd_llava_pope.py:117-122
        "You are an object detector to recognize every different objects.",
        "You are an object detector to recognize every different objects by focusing the shapes, colors and relationships of objects.",
        "I want you avoid any specific identification or categorization of the objects depicted.",
        "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
        "You are an object detector to provide a general overview or impression of the image."]
    runs = []

    def icd_run(name, question, image, seed, instruction=0, fmt="", gen=None, cd_alpha=1.0, cd_beta=0.1,
                pass_alpha=True):
        qs = "<image>\n" + question                              # icd_llava_pope.py:49
        conv = conv_templates["llava_v1"].copy()                # :52-56
        conv.append_message(conv.roles[0], qs + fmt)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
        conv_custom = conv_templates["llava_custom"].copy()     # :58-63
        conv_custom.system = instructions[instruction]
        conv_custom.append_message(conv_custom.roles[0], qs + fmt)
        conv_custom.append_message(conv_custom.roles[1], None)
        prompt_cd = conv_custom.get_prompt()
        ids_cd = tokenizer_image_token(prompt_cd, tok, -200, return_tensors="pt").unsqueeze(0)
        image_tensor = images[image]
        call = dict(inputs=ids, images=image_tensor.unsqueeze(0), input_ids_cd=ids_cd, cd_beta=cd_beta,
                    use_cache=True, **(gen or dict(do_sample=True, temperature=1, top_p=1, max_new_tokens=8)))
        if pass_alpha:
            call["cd_alpha"] = cd_alpha
        knobs = dict(alpha=cd_alpha if pass_alpha else 0.5, beta=cd_beta)
        out, contrasted, last, _ = run_generate(model, seed, None, dict(call), knobs)
        main, branch = split_steps(last, 2)
        runs.append(dict(
            name=name, method="icd", knobs=knobs, seed=seed, instruction=instruction, format=fmt,
            prompt=prompt, prompt_cd=prompt_cd, input_ids=ids, input_ids_cd=ids_cd, image=image,
            generate_kwargs={k: v for k, v in call.items() if k not in ("inputs", "images", "input_ids_cd")},
            sequences=out.sequences, scores=torch.stack(out.scores, 1).float(),
            contrasted=torch.stack(contrasted, 1), main_logits=torch.stack(main, 1),
            branch_logits=torch.stack(branch, 1),
        ))

    q0, q1 = QUESTIONS
    greedy = dict(do_sample=True, top_k=1, max_new_tokens=8)
    icd_run("greedy_topk1_a1_b0.1_instr0", q0, "image0", 42, gen=greedy)
    icd_run("greedy_topk1_a1_b0_instr3", q1, "image1", 42, instruction=3, gen=greedy, cd_beta=0.0)
    icd_run("greedy_topk1_a2_b0.2_instr1_yn", q0, "image1", 1, instruction=1, fmt=" Please only answer yes or no.",
            gen=greedy, cd_alpha=2.0, cd_beta=0.2)
    icd_run("sample_script_defaults_seed42_instr0", q0, "image0", 42)  # temperature 1, top_p 1, top_k 50 (config)
    icd_run("sample_seed7_instr2_ow", q1, "image0", 7, instruction=2, fmt=" Please answer this question with one word.")
    icd_run("sample_b0_seed3_instr4", q1, "image1", 3, instruction=4, cd_beta=0.0)
    icd_run("sample_alpha_fallback_0.5_seed11", q0, "image1", 11, pass_alpha=False)
    icd_run("sample_t0.8_topk8_a1.5_seed13", q1, "image0", 13, cd_alpha=1.5,
            gen=dict(do_sample=True, temperature=0.8, top_k=8, top_p=1.0, max_new_tokens=8))
    meta = dict(call_form="generate(input_ids, images=, input_ids_cd=, cd_alpha=, cd_beta=, do_sample=True, "
                          "temperature=1, top_p=1) after transformers.set_seed(seed)",
                instructions=instructions, import_error="icd_llava_pope.py:18 imports evolve_icd_sampling; "
                "icd_sample_llava.py defines evolve_iccd_sampling")
    save("icd", meta, runs)


def record_m3id(args):
    src = Path(args.src)
    sys.path[:0] = [str(src), str(src / "experiments")]
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from avisc_utils import avisc_sample
    from transformers.generation.utils import SampleDecoderOnlyOutput

    avisc_sample.SampleDecoderOnlyOutput = SampleDecoderOnlyOutput  # published NameError (avisc_sample.py:363)
    avisc_sample.evolve_avisc_sampling()

    model = load_original_llava(LlavaLlamaForCausalLM)
    tok = load_tokenizer()
    images = torch.load(DATA / "images.pt")
    runs = []

    def m3id_run(name, question, image, seed, gen=None, cd_beta=0.1):
        prompt = llava_v1_prompt(conv_templates, question)          # mme_llava.py:111-122 (no suffix)
        ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
        image_tensor = images[image]
        call = dict(inputs=ids, images=image_tensor.unsqueeze(0), images_cd=None, cd_alpha=1.0, cd_beta=cd_beta,
                    use_cache=True, use_avisc=False, layer_gamma=0.5, masking_scheme="zeros", lamb=100.0,
                    use_m3id=True,
                    **(gen or dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=8)))
        out, contrasted, last, _ = run_generate(model, seed, None, dict(call), dict(beta=cd_beta))
        main, branch = split_steps(last, 2)
        runs.append(dict(
            name=name, method="m3id", knobs=dict(beta=cd_beta), seed=seed, prompt=prompt, input_ids=ids,
            image=image, generate_kwargs={k: v for k, v in call.items() if k not in ("inputs", "images")},
            sequences=out.sequences, scores=torch.stack(out.scores, 1).float(),
            contrasted=torch.stack(contrasted, 1), main_logits=torch.stack(main, 1),
            branch_logits=torch.stack(branch, 1),
        ))

    q0, q1 = QUESTIONS
    greedy = dict(do_sample=True, top_k=1, max_new_tokens=8)
    m3id_run("greedy_topk1_b0.1", q0, "image0", 55, gen=greedy)
    m3id_run("greedy_topk1_b0", q1, "image1", 55, gen=greedy, cd_beta=0.0)
    m3id_run("greedy_topk1_b0.3_long", q1, "image0", 55, gen=dict(do_sample=True, top_k=1, max_new_tokens=16),
             cd_beta=0.3)
    m3id_run("sample_script_defaults_seed55", q0, "image0", 55)   # mme_llava.py defaults; top_k 50 from config
    m3id_run("sample_b0_seed4", q1, "image1", 4, cd_beta=0.0)
    m3id_run("sample_t0.6_topk6_seed8", q1, "image0", 8,
             gen=dict(do_sample=True, temperature=0.6, top_k=6, top_p=1.0, max_new_tokens=8))

    # the branch's own cache is in effect although avisc_sample.py:327 assigns the update to model_kwargs_cd:
    # transformers 4.31's _update_model_kwargs_for_generation mutates model_kwargs_m3id in place.
    r = runs[2]
    text_ids = r["sequences"][r["sequences"] != -200].unsqueeze(0)
    with torch.inference_mode():
        full = model(input_ids=text_ids[:, :-1]).logits[0, -r["branch_logits"].shape[1]:]
    torch.testing.assert_close(full.float(), r["branch_logits"][0], rtol=1e-4, atol=1e-4)
    meta = dict(call_form="generate(input_ids, images=, images_cd=None, cd_beta=, use_avisc=False, use_m3id=True, "
                          "do_sample=True, ...) after transformers.set_seed(seed)", lamda=0.02, t_first=1)
    save("m3id", meta, runs)


def _stub_pai_encoders():
    """PAI's llava/model/multimodal_encoder/clip_encoder.py imports EVA-CLIP and InternViT/InternVL modules that need
    timm, flash_attn, peft and torchvision; the tiny model uses the plain CLIP path, so stand-ins are registered."""
    base = "llava.model.multimodal_encoder."
    for mod, names in {
        "intern_vit_6b.modeling_intern_vit": ["InternVisionModel"],
        "internvl_14b": [],
        "internvl_14b.configuration_internvl": ["InternVLConfig"],
        "internvl_14b.modeling_internvl": ["InternVLModel"],
        "eva_clip.modeling_evaclip": ["EvaCLIPVisionModel"],
    }.items():
        m = types.ModuleType(base + mod)
        m.__path__ = []
        for n in names:
            setattr(m, n, type(n, (), {}))
        sys.modules[base + mod] = m


def record_pai(args):
    src = Path(args.src)
    sys.path[:0] = [str(src)]
    _stub_pai_encoders()
    from llava.model import LlavaLlamaForCausalLM
    from attention import llama_modify
    from CFG import CFGLogits
    from constants import INSTRUCTION_TEMPLATE, SYSTEM_MESSAGE

    tok = load_tokenizer()
    images = torch.load(DATA / "images.pt")
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2   # constants.IMAGE_TOKEN_LENGTH = 576 for the real model
    runs = []

    def inputs(question):
        """model_loader.prepare_llava_inputs / init_cfg_processor (batch 1): bos + before + [-200] + after, and the
        negative prompt bos + before + after; pope_eval.py:94-96 puts SYSTEM_MESSAGE right before the template."""
        template = SYSTEM_MESSAGE + INSTRUCTION_TEMPLATE["llava-1.5"]
        text = template.replace("<question>", question)
        before, after = text.split("<ImageHere>")
        tb = tok([before], return_tensors="pt", add_special_tokens=False).input_ids
        ta = tok([after], return_tensors="pt", add_special_tokens=False).input_ids
        bos = torch.ones([1, 1], dtype=torch.int64) * tok.bos_token_id
        img_start = tb.shape[1] + 1
        ids = torch.cat([bos, tb, torch.full((1, 1), -200), ta], dim=1)
        uncond = torch.cat([bos, tb, ta], dim=1)
        return text, ids, uncond, img_start, img_start + n_image_tokens

    def pai_run(name, question, image, seed, use_attn=True, use_cfg=True, alpha=0.2, gamma=1.1, start_layer=2,
                end_layer=4, gen=None, attn="eager"):
        model = load_pai_model(LlavaLlamaForCausalLM, attn)
        text, ids, uncond, img_start, img_end = inputs(question)
        llama_modify(model, start_layer, end_layer, use_attn, alpha, use_cfg, img_start, img_end)
        procs = [CFGLogits(gamma, uncond, model, start_layer=start_layer, end_layer=end_layer)] if use_cfg else []
        call = dict(input_ids=ids, images=images[image].unsqueeze(0), use_cache=True, num_beams=1,
                    output_attentions=False, output_hidden_states=False, return_dict=True,
                    logits_processor=procs, **(gen or dict(do_sample=False, max_new_tokens=8)))
        knobs = dict(alpha=alpha, gamma=gamma, start_layer=start_layer, end_layer=end_layer, use_attn=use_attn,
                     use_cfg=use_cfg)
        out, processed, last, _ = run_generate(model, seed, None, dict(call), knobs)
        per_step = 2 if use_cfg and gamma != 1 else 1
        split = split_steps(last, per_step)
        rec = dict(
            name=name, method="pai", knobs=knobs, seed=seed, attn_implementation=attn, prompt=text, input_ids=ids,
            uncond_ids=uncond, img_start_idx=img_start, img_end_idx=img_end, image=image,
            generate_kwargs={k: v for k, v in call.items() if k not in ("input_ids", "images", "logits_processor")},
            sequences=out.sequences, scores=torch.stack(out.scores, 1).float(),
            processed=torch.stack(processed, 1), main_logits=torch.stack(split[0], 1),
        )
        if per_step == 2:
            rec["branch_logits"] = torch.stack(split[1], 1)
        runs.append(rec)

    q0, q1 = QUESTIONS
    sample = dict(do_sample=True, max_new_tokens=8)     # pope_eval.py --sample: temperature 1, top_k 50 (config)
    pai_run("greedy_attn_cfg_g1.1_a0.2_l2-4", q0, "image0", 927)           # README setting, first token not amplified
    pai_run("greedy_attn_cfg_g2_a0.5_l1-3", q1, "image1", 927, gamma=2.0, alpha=0.5, start_layer=1, end_layer=3)
    pai_run("greedy_attn_only_a0.2_l2-4", q0, "image0", 927, use_cfg=False)
    pai_run("greedy_attn_only_a1_l0-4", q1, "image0", 927, use_cfg=False, alpha=1.0, start_layer=0)
    pai_run("greedy_cfg_only_g1.1_l2-4", q0, "image1", 927, use_attn=False)
    pai_run("greedy_attn_cfg_g1_noop", q0, "image0", 927, gamma=1.0, alpha=0.5)  # gamma 1: amplification never on
    pai_run("sample_attn_cfg_g1.1_seed927", q0, "image0", 927, gen=sample)
    pai_run("sample_attn_cfg_g2_a0.4_seed5", q1, "image1", 5, gamma=2.0, alpha=0.4, gen=sample)
    pai_run("sample_attn_only_t0.7_topk5_seed6", q1, "image0", 6, use_cfg=False,
            gen=dict(do_sample=True, temperature=0.7, top_k=5, max_new_tokens=8))
    pai_run("greedy_attn_cfg_sdpa_no_causal_mask", q0, "image0", 927, attn="sdpa")   # evidence only
    meta = dict(call_form="llama_modify(model, start, end, use_attn, alpha, use_cfg, img_start, img_end); "
                          "generate(input_ids=, images=, logits_processor=[CFGLogits(gamma, uncond, model, start, "
                          "end)], do_sample=...) after setup_seeds() (torch.manual_seed)",
                n_image_tokens=n_image_tokens, system_message=SYSTEM_MESSAGE,
                template=INSTRUCTION_TEMPLATE["llava-1.5"])
    save("pai", meta, runs)


def load_pai_model(cls, attn):
    config = cls.config_class.from_pretrained(LLAVA_DIR)
    config.mm_vision_tower = str(CLIP_DIR)
    # transformers 4.37.0 ignores attn_implementation="eager" next to an explicit config (the property reads
    # "eager" while unset) and then picks sdpa; setting it on the config is what takes effect.
    config._attn_implementation = attn
    model = cls.from_pretrained(LLAVA_DIR, config=config).eval()
    assert model.config._attn_implementation == attn
    model.get_model().get_vision_tower().load_model()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["build", "vcd", "icd", "m3id", "pai"])
    parser.add_argument("--src", required=True, help="the extracted published repository (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(ROOT)
    {"build": build, "vcd": record_vcd, "icd": record_icd, "m3id": record_m3id, "pai": record_pai}[args.what](args)


if __name__ == "__main__":
    main()
