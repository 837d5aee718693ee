"""Record what the PUBLISHED OPERA fork computes on tiny LLaVA weights, for tests/test_published_opera.py.

The reference is shikiw/OPERA at commit 61426efe4e2e53207f32d9112a86ba5f8364d1d9 (2024-07-26): its modified
transformers 4.29.2 (``transformers-4.29.2/src/transformers/generation/utils.py``: ``generate(opera_decoding=True)``
and ``opera_beam_search``) and its LLaVA-1.5 classes (``minigpt4/models/llava_llama.py``, ``llava_arch.py``) driven
the way its wrapper ``minigpt4/models/llava.py`` drives them (input ids ``[bos, before, -200, after]``, ``images=``,
``output_attentions=True``, ``key_position`` computed from the prompt). Nothing of the fork is committed here.

Two steps, two interpreters:

1. ``build`` (the project's python: transformers 4.40) writes the tiny llava-hf checkpoint and the prompts/images::

       OMP_NUM_THREADS=1 python3 tests/published/record_opera.py build

   A random-weight ``LlavaForConditionalGeneration`` (hallupatch.testing.tiny, hidden 32, 3 layers, 16 visual
   tokens) with a planted attention channel in the LAST layer (see :func:`plant_columnar_attention`): a few
   "marker" words draw every later query of head 0 to them, so their response columns keep large products and
   OPERA's retrospection actually fires (with diffuse random attention every column underflows and it never does).

2. ``record`` (a separate venv with the fork) runs the fork on exactly those saved weights::

       # once: the fork's snapshot extracted (not into this repo) to /work/venvs/src/opera
       python3 -m venv /work/venvs/opera
       /work/venvs/opera/bin/pip install torch==2.13.0 numpy "huggingface-hub<0.20" safetensors regex \\
           requests pyyaml filelock tqdm packaging pillow
       OMP_NUM_THREADS=1 PYTHONPATH=/work/venvs/src/opera/transformers-4.29.2/src:/work/venvs/src/opera \\
           /work/venvs/opera/bin/python tests/published/record_opera.py record

   The fork runs unmodified with torch 2.13 (no patch was needed). Its LLaVA modules are loaded as plain files
   (``minigpt4/__init__`` would import the whole MiniGPT-4/BLIP stack); the weights are converted from llava-hf
   key names to the original LLaVA ones (:func:`to_original_llava`). The rollbacks are observed with a
   ``sys.settrace`` tracer that reads ``opera_beam_search``'s local variables at chosen source lines (found by
   their text, see :class:`OperaTracer`); the fork's logic is not edited.

Output: ``tests/data/published_opera/recordings.json`` (tokens, per-iteration rollback locations, rollbacks,
one step's penalties per case).
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "published_opera"
FORK_COMMIT = "61426efe4e2e53207f32d9112a86ba5f8364d1d9"
SEED = 0
NUM_LAYERS = 3
HIDDEN = 32
IMAGE_SIZE = 56  # 4x4 patches of 14 -> 16 visual tokens
N_VISUAL = (IMAGE_SIZE // 14) ** 2
MARKER_WORDS = ["cat"]  # chosen by trying: it first appears after response position 10 in several runs
SYSTEM = ("a chat between a curious human and an artificial intelligence assistant . the assistant gives "
          "helpful , detailed , and polite answers to the questions of the human . the assistant can see the "
          "image and can describe the objects , the shape , the color and the position of any object in the scene .")
PROMPTS = [  # (text before the image, text after it); long enough that diffuse attention columns decay
    (SYSTEM + " user :", "describe this image in detail . assistant :"),
    (SYSTEM + " user :", "what is in the picture ? please describe the scene with any detail you see . assistant :"),
    (SYSTEM + " user : what can you see here ?", "is there a cat or a dog in the photo ? assistant :"),
    ("user : please describe the picture .", "how many objects are in the image ? answer using a single word . "
     "assistant :"),
]
SUPPRESSED = ["<unk>", "<s>", "<pad>", "<image>"]  # kept out of the responses by the LM head (see build)
EOS_LIFT = 16.0  # some beams end early: the fork's (4.29) length normalisation then decides the winner
CONSTANT_DIM, MARKER_DIM = 0, 1  # residual-stream channels reserved by the plant
PLANT_HEAD, PLANT_PAIR = 0, 3  # head 0, rotary pair (3, 7) of head_dim 8: ~1e-3 rad per token, almost position-free
QUERY_GAIN, KEY_GAIN = 6.0, 6.0

# (name, OPERA knobs, max_new_tokens)
CASES = [
    ("default", dict(scale_factor=50.0, threshold=15, num_attn_candidates=5, penalty_weights=1.0), 64),
    ("many_rollbacks", dict(scale_factor=50.0, threshold=5, num_attn_candidates=5, penalty_weights=1.0), 64),
    ("fast", dict(scale_factor=50.0, threshold=25, num_attn_candidates=1, penalty_weights=1.0), 128),
    # column products hover at float16's smallest subnormal (5.96e-8) and underflow to 0: ties -> column 0
    ("small_scale", dict(scale_factor=20.0, threshold=5, num_attn_candidates=5, penalty_weights=1.0), 64),
]
NUM_BEAMS = 5
PENALTY_CASES, PENALTY_ITERATIONS = ("default", "small_scale"), (3, 14)  # before / after the 10-column rule
PLAIN_MAX_NEW_TOKENS = 64  # the fork's plain (non-OPERA) beam search, to check the weights and the conversion


# ----------------------------------------------------------------------------------------------- build (4.40)
def plant_columnar_attention(model) -> None:
    """Make the marker words columnar attention sinks in the last layer's head 0.

    Residual channel CONSTANT_DIM holds the same value for every token (embeddings, projector bias) and channel
    MARKER_DIM is non-zero only for marker words; no layer writes either channel (zero rows in ``o_proj`` and
    ``down_proj``). The last layer's head 0 reads CONSTANT_DIM into its query and MARKER_DIM into its key on
    rotary pair PLANT_PAIR, whose rotation is negligible over these lengths, so every later query of that head
    attends strongly to every marker it has seen, whatever the distance.
    """
    lm = model.language_model.model
    embed = lm.embed_tokens.weight
    projector = model.multi_modal_projector
    head_dim = HIDDEN // model.config.text_config.num_attention_heads
    with torch.no_grad():
        embed[:, CONSTANT_DIM] = 0.5
        embed[:, MARKER_DIM] = 0.0
        projector.linear_2.weight[[CONSTANT_DIM, MARKER_DIM]] = 0.0
        projector.linear_2.bias[CONSTANT_DIM] = 0.5
        projector.linear_2.bias[MARKER_DIM] = 0.0
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[[CONSTANT_DIM, MARKER_DIM]] = 0.0
            layer.mlp.down_proj.weight[[CONSTANT_DIM, MARKER_DIM]] = 0.0
        attn = lm.layers[-1].self_attn
        row = PLANT_HEAD * head_dim + PLANT_PAIR
        partner = row + head_dim // 2
        for proj, source, gain in ((attn.q_proj, CONSTANT_DIM, QUERY_GAIN), (attn.k_proj, MARKER_DIM, KEY_GAIN)):
            proj.weight[[row, partner]] = 0.0
            proj.weight[row, source] = gain
    return None


def build() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from hallupatch.testing.tiny import tiny_llava

    model, processor = tiny_llava(seed=SEED, num_layers=NUM_LAYERS, hidden_size=HIDDEN, image_size=IMAGE_SIZE)
    tokenizer = processor.tokenizer
    markers = tokenizer.convert_tokens_to_ids(MARKER_WORDS)
    with torch.no_grad():
        plant_columnar_attention(model)
        model.language_model.model.embed_tokens.weight[markers, MARKER_DIM] = 0.5
        # the image/pad/bos/unk ids never come out: a large negative logit read from the constant channel
        suppressed = tokenizer.convert_tokens_to_ids(SUPPRESSED)
        model.language_model.lm_head.weight[suppressed] = 0.0
        model.language_model.lm_head.weight[suppressed, CONSTANT_DIM] = -40.0
        # a constant lift of the EOS logit: some beams finish early and compete with longer ones
        model.language_model.lm_head.weight[tokenizer.eos_token_id, CONSTANT_DIM] += EOS_LIFT
    DATA.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(DATA, safe_serialization=True)
    processor.save_pretrained(DATA)

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED + 1)
    # stored in float16 (half the bytes); both sides read them as float32
    pixel_values = torch.randn(len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).half()
    image_token = model.config.image_token_index
    prompts = []
    for before, after in PROMPTS:
        ids_before = tokenizer(before, add_special_tokens=False).input_ids
        ids_after = tokenizer(after, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids_before + ids_after, (before, after)
        prompts.append([tokenizer.bos_token_id] + ids_before + [image_token] + ids_after)
    save_file({"pixel_values": pixel_values.contiguous()}, str(DATA / "pixel_values.safetensors"))
    (DATA / "prompts.json").write_text(json.dumps({
        "input_ids": prompts, "image_token_index": image_token, "n_visual": N_VISUAL,
        "marker_tokens": markers,
    }, indent=1) + "\n")
    print("wrote", DATA)


# --------------------------------------------------------------------------------------------- record (fork)
def load_fork_llava_modules():
    """The fork's ``llava_llama`` module, imported as a file (not through ``minigpt4/__init__``)."""
    import importlib.util

    root = next(Path(p) for p in sys.path if (Path(p) / "minigpt4" / "models" / "llava_llama.py").exists())
    for name, folder in (("minigpt4", root / "minigpt4"), ("minigpt4.models", root / "minigpt4" / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    modules = {}
    for name in ("llava_arch", "llava_llama"):
        spec = importlib.util.spec_from_file_location(f"minigpt4.models.{name}", root / "minigpt4" / "models" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["llava_llama"]


def to_original_llava(hf_state: dict) -> dict:
    """llava-hf key names -> the original LLaVA repo's (``LlavaLlamaForCausalLM`` + its CLIP tower)."""
    out = {}
    for key, value in hf_state.items():
        if key.startswith("language_model.model."):
            out["model." + key[len("language_model.model."):]] = value
        elif key == "language_model.lm_head.weight":
            out["lm_head.weight"] = value
        elif key.startswith("multi_modal_projector.linear_1."):
            out["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("multi_modal_projector.linear_2."):
            out["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("vision_tower."):
            out["model.vision_tower.vision_tower." + key[len("vision_tower."):]] = value
        else:
            raise KeyError(f"unexpected llava-hf key {key}")
    return out


def load_fork_model(tmp: Path):
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    llava_llama = load_fork_llava_modules()
    hf_config = json.loads((DATA / "config.json").read_text())
    # config.json holds the differences from each config class's defaults (the same defaults in 4.29 and 4.40)
    text = LlamaConfig(**hf_config["text_config"]).to_dict()
    vision = hf_config["vision_config"]
    # the original repo loads its CLIP tower from a folder named in the config (mm_vision_tower)
    tower_dir = tmp / "clip"
    tower_dir.mkdir(parents=True, exist_ok=True)
    hf_state = load_file(str(DATA / "model.safetensors"))
    tower = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}))
    missing, unexpected = tower.load_state_dict(
        {k[len("vision_tower."):]: v for k, v in hf_state.items() if k.startswith("vision_tower.")}, strict=False)
    assert not unexpected and missing == ["vision_model.embeddings.position_ids"], (missing, unexpected)  # a buffer
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(tower_dir)
    config = llava_llama.LlavaConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        max_position_embeddings=text["max_position_embeddings"], rms_norm_eps=text["rms_norm_eps"],
        hidden_act=text["hidden_act"], tie_word_embeddings=text["tie_word_embeddings"],
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
        mm_vision_tower=str(tower_dir), mm_hidden_size=vision["hidden_size"], mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf_config.get("vision_feature_layer", -2), mm_vision_select_feature="patch",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True,
    )
    assert hf_config.get("vision_feature_select_strategy", "default") == "default"
    assert hf_config["projector_hidden_act"] == "gelu"
    model = llava_llama.LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()  # as the fork's LLaVa wrapper does (delay_load=True in the config)
    state = to_original_llava(hf_state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary_emb" not in k and "position_ids" not in k], missing
    return model.float().eval(), config


class OperaTracer:
    """Reads ``opera_beam_search``'s locals at a few source lines (matched by text) while it runs."""

    MARK_ITERATION = 'current_state = {}'
    MARK_SCORED = 'if len(history_states) >= history_length:'
    MARK_ROLLBACK = 'input_ids = history_states[-2]["input_ids"]'
    MARK_FALLBACK = 'next_token_logits.fill_(-999.)'

    def __init__(self, penalty_iterations=()):
        from transformers.generation.utils import GenerationMixin
        import inspect

        self.code = GenerationMixin.opera_beam_search.__code__
        lines, first = inspect.getsourcelines(GenerationMixin.opera_beam_search)
        self.lines = {}
        for mark in (self.MARK_ITERATION, self.MARK_SCORED, self.MARK_ROLLBACK, self.MARK_FALLBACK):
            hits = [first + i for i, text in enumerate(lines) if text.strip() == mark]
            assert len(hits) == 1, (mark, hits)
            self.lines[hits[0]] = mark
        self.penalty_iterations = set(penalty_iterations)
        self.iteration = -1
        self.locations, self.rollbacks, self.penalties, self.swallowed = [], [], [], []
        # iterations past the 10-column rule whose float16 column scores overflowed (some inf) or all underflowed
        self.overflow_iterations, self.underflow_iterations = 0, 0
        self.rollback_started = False

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)

    def _global(self, frame, event, arg):
        return self._local if frame.f_code is self.code else None

    def _local(self, frame, event, arg):
        if event == "exception":
            if arg[0] is not AssertionError:  # the fork's own "no rollback" signal is `assert False`
                self.swallowed.append({"iteration": self.iteration, "error": repr(arg[1])})
            return self._local
        if event != "line" or frame.f_lineno not in self.lines:
            return self._local
        mark, f = self.lines[frame.f_lineno], frame.f_locals
        if mark == self.MARK_ITERATION:
            self.iteration += 1
            self.rollback_started = False
        elif mark == self.MARK_SCORED:
            self.locations.append(int(f["rollback_loc"]))
            if int(f["cur_response_lens"]) > 10:
                column_max = f["rollback_scores"]
                self.overflow_iterations += bool(torch.isinf(column_max).any())
                self.underflow_iterations += bool((column_max == 0).all())
            if self.iteration in self.penalty_iterations:
                self.penalties.append({
                    "iteration": self.iteration,
                    "response_length": int(f["cur_response_lens"]),
                    "input_ids": f["input_ids"].tolist(),  # every beam's sequence (image token -200)
                    "beam_scores": f["beam_scores"].float().tolist(),
                    "candidate_tokens": f["candidate_tokens"].tolist(),
                    "penalty": f["penalty_scores"].float().tolist(),
                    "image_attention": f["attn_scores"].float().tolist(),
                    "column_max": f["rollback_scores"].float().tolist(),
                    "column_argmax": f["rollback_locs"].tolist(),
                    "penalised_scores": f["candidate_token_scores"].float().tolist(),
                })
        elif mark == self.MARK_ROLLBACK:
            self.rollback_started = True
            self.rollbacks.append({
                "iteration": self.iteration,
                "from_position": int(f["cur_response_lens"]) - 1,
                "location": int(f["rollback_loc"]),
                "to_position": int(f["rollback_pos"]),
            })
        elif mark == self.MARK_FALLBACK and self.rollback_started:
            self.rollbacks[-1]["aborted"] = True  # an error inside the rollback, swallowed by the bare except
        return self._local


def run_fork(model, input_ids, pixel_values, knobs, max_new_tokens, penalty_iterations=(), opera=True):
    """One call as the fork's LLaVa.generate makes it; returns (generated tokens of the best beam, tracer).

    ``opera=False``: the fork's plain beam search (transformers 4.29.2's), same call otherwise."""
    image_pos = input_ids.index(IMAGE_TOKEN_FORK)
    key_position = {  # minigpt4/models/llava.py, with NUM_IMAGE_TOKENS = this tower's patch count
        "image_start": image_pos,
        "image_end": image_pos + N_VISUAL - 1,
        "response_start": len(input_ids) + N_VISUAL - 1,
    }
    ids = torch.tensor([input_ids])
    with torch.no_grad(), OperaTracer(penalty_iterations) as tracer:
        out = model.generate(
            input_ids=ids, use_cache=True, do_sample=False, num_beams=NUM_BEAMS, max_new_tokens=max_new_tokens,
            pad_token_id=model.config.pad_token_id, bos_token_id=model.config.bos_token_id,
            eos_token_id=model.config.eos_token_id, images=pixel_values, output_attentions=True,
            return_dict_in_generate=False, opera_decoding=opera, key_position=key_position, **knobs,
        )
    return out[0, ids.shape[1]:].tolist(), tracer, key_position


IMAGE_TOKEN_FORK = -200


def record(only=None, show=False) -> None:
    import tempfile

    import transformers
    from safetensors.torch import load_file

    assert transformers.__version__ == "4.29.2" and hasattr(transformers.GenerationMixin, "opera_beam_search"), \
        "run `record` with the fork's transformers on PYTHONPATH (see the module docstring)"
    prompts = json.loads((DATA / "prompts.json").read_text())
    pixels = load_file(str(DATA / "pixel_values.safetensors"))["pixel_values"].float()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_fork_model(Path(tmp))
        results = []
        for name, knobs, max_new in CASES:
            if only and name not in only:
                continue
            for p, hf_ids in enumerate(prompts["input_ids"]):
                fork_ids = [IMAGE_TOKEN_FORK if t == prompts["image_token_index"] else t for t in hf_ids]
                steps = PENALTY_ITERATIONS if name in PENALTY_CASES else ()
                tokens, tracer, key_position = run_fork(
                    model, fork_ids, pixels[p:p + 1], knobs, max_new, penalty_iterations=steps)
                entry = {
                    "case": name, "prompt": p, "knobs": knobs, "num_beams": NUM_BEAMS, "max_new_tokens": max_new,
                    "key_position": key_position, "tokens": tokens, "locations": tracer.locations,
                    "rollbacks": tracer.rollbacks, "swallowed_errors": tracer.swallowed,
                    "overflow_iterations": tracer.overflow_iterations,
                    "underflow_iterations": tracer.underflow_iterations,
                    "penalties": tracer.penalties,
                }
                results.append(entry)
                print(f"{name:15s} prompt {p}: {len(tracer.rollbacks)} rollbacks "
                      f"{[(r['from_position'], r['location'], r['to_position']) for r in tracer.rollbacks]} "
                      f"tokens {tokens}", flush=True)
                if show:
                    print("   locations", tracer.locations)
        plain = []
        for p, hf_ids in enumerate(prompts["input_ids"]):
            fork_ids = [IMAGE_TOKEN_FORK if t == prompts["image_token_index"] else t for t in hf_ids]
            tokens, _, _ = run_fork(model, fork_ids, pixels[p:p + 1], {}, PLAIN_MAX_NEW_TOKENS, opera=False)
            plain.append({"prompt": p, "max_new_tokens": PLAIN_MAX_NEW_TOKENS, "tokens": tokens})
            print(f"plain beam      prompt {p}: tokens {tokens}", flush=True)
    if only:
        return
    header = {"fork": "shikiw/OPERA", "fork_commit": FORK_COMMIT, "transformers": transformers.__version__,
              "torch": torch.__version__, "num_beams": NUM_BEAMS}
    lines = [json.dumps(header)[:-1] + ', "plain_beam_search": ['] + [json.dumps(r) + "," for r in plain]
    lines[-1] = lines[-1][:-1]
    lines += ['], "runs": ['] + [json.dumps(r) + "," for r in results]  # one run per line
    lines[-1] = lines[-1][:-1]
    (DATA / "recordings.json").write_text("\n".join(lines) + "\n]}\n")
    json.loads((DATA / "recordings.json").read_text())
    print("wrote", DATA / "recordings.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["build", "record"])
    parser.add_argument("--only", nargs="*", help="record: just these cases, print, write nothing")
    parser.add_argument("--show", action="store_true", help="record: also print per-iteration locations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.step == "build":
        build()
    else:
        record(args.only, args.show)


if __name__ == "__main__":
    main()
