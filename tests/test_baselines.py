"""VCD, ICD, M3ID and PAI (issue 18, DESIGN §4e) against an independent float64 re-computation
(``baselines_reference``: a plain loop of uncached main and branch forwards), and their API guarantees."""
import copy
import pickle

import pytest
import torch
import transformers

import hallupatch
from baselines_reference import (
    amplified, diffusion, double_copy, greedy, last_logits, m3id, pai_cfg, vcd_icd,
)
from hallupatch.testing.tiny import tiny_image

STEPS = 4
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True, output_logits=True,
              return_dict_in_generate=True)
QUESTIONS = ["<image> what is in the picture ?", "a chat between a human and an assistant . <image> how many dog ?"]
SYSTEM = "a chat between a human and an assistant ."


def inputs(processor, texts=QUESTIONS, seeds=(1, 2)):
    return processor(text=list(texts), images=[tiny_image(s) for s in seeds[:len(texts)]], return_tensors="pt",
                     padding=True)


def without_image(ids, mask, token):
    keep = ids[0] != token
    return ids[:, keep], mask[:, keep]


def assert_scores_close(ours, reference):
    for got, want in zip(ours, reference):
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.0)])
def test_vcd_greedy_matches_reference(llava, alpha, beta):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    model64 = double_copy(model)
    noisy = diffusion(batch.pixel_values, torch.randn(batch.pixel_values.shape, generator=torch.Generator().manual_seed(5)), 500)
    hallupatch.apply(model, "vcd", alpha=alpha, beta=beta)
    out = model.generate(**batch, images_cd=noisy.float(), **GREEDY)
    ref_tokens, ref_scores = greedy(
        model64, STEPS, (batch.input_ids, batch.attention_mask, batch.pixel_values),
        (batch.input_ids, batch.attention_mask, noisy.float()), lambda z, zb, s: vcd_icd(z, zb, alpha, beta),
    )
    trace = hallupatch.get_trace(model, "vcd")
    assert torch.equal(out.sequences[:, -STEPS:], ref_tokens)
    assert_scores_close(trace.contrasted, ref_scores)
    # output_logits: the main branch's raw logits, uncontrasted
    torch.testing.assert_close(out.logits[0].double(), last_logits(model64, batch.input_ids, batch.attention_mask,
                                                                     batch.pixel_values), rtol=1e-4, atol=1e-4)
    assert len(trace.branch) == STEPS and not torch.equal(trace.branch[0], trace.main[0])


def test_vcd_noise_is_drawn_at_prefill_from_the_global_generator(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    hallupatch.apply(model, "vcd")
    sample = dict(GREEDY, do_sample=True, top_k=5, temperature=0.7)
    transformers.set_seed(3)
    out = model.generate(**batch, **sample)
    trace = hallupatch.get_trace(model, "vcd")
    transformers.set_seed(3)
    eps = torch.randn_like(batch.pixel_values.float())   # the published script's draw, before generate
    expected = diffusion(batch.pixel_values, eps, 500)
    torch.testing.assert_close(trace.images_cd.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trace.images_cd, 0.86302 * batch.pixel_values + 0.50517 * eps, rtol=0, atol=1e-4)
    for step, scores in enumerate(out.scores):   # then the sampling draws, one per step, from the scores
        token = torch.multinomial(torch.softmax(scores, -1), 1)
        assert token.item() == out.sequences[0, -STEPS + step].item()
    # the seeded form does not touch the global stream and gives the same noise every call
    hallupatch.apply(model, "vcd", noise_seed=11)
    state = torch.random.get_rng_state()
    model.generate(**batch, **GREEDY)
    first = hallupatch.get_trace(model, "vcd").images_cd
    model.generate(**batch, **GREEDY)
    assert torch.equal(first, hallupatch.get_trace(model, "vcd").images_cd)
    assert torch.equal(state, torch.random.get_rng_state())


def test_vcd_sampling_applies_warpers_after_the_contrast(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    model64 = double_copy(model)
    hallupatch.apply(model, "vcd", alpha=1.0, beta=0.1)
    transformers.set_seed(7)
    out = model.generate(**batch, do_sample=True, top_k=3, temperature=0.5, max_new_tokens=STEPS,
                         min_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True)
    noisy = hallupatch.get_trace(model, "vcd").images_cd
    ids, mask = batch.input_ids, batch.attention_mask
    for step in range(STEPS):   # teacher-forced on the sampled tokens
        z = last_logits(model64, ids, mask, batch.pixel_values)
        zb = last_logits(model64, ids, mask, noisy)
        want = vcd_icd(z, zb, 1.0, 0.1) / 0.5
        kth = want.topk(3).values[:, -1:]
        want = want.masked_fill(want < kth, -float("inf"))
        assert_scores_close([out.scores[step]], [want])
        token = out.sequences[:, ids.shape[1]:ids.shape[1] + 1]
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)


def test_icd_greedy_matches_reference_and_icd_prompt(llava):
    model, processor = llava
    main_text = QUESTIONS[1]
    cd_text = hallupatch.icd_prompt(main_text, instruction="you can see the image", system=SYSTEM)
    assert cd_text == "you can see the image <image> how many dog ?"
    batch = inputs(processor, [main_text])
    cd = inputs(processor, [cd_text])
    model64 = double_copy(model)
    hallupatch.apply(model, "icd")
    out = model.generate(**batch, input_ids_cd=cd.input_ids, **GREEDY)
    ref_tokens, ref_scores = greedy(
        model64, STEPS, (batch.input_ids, batch.attention_mask, batch.pixel_values),
        (cd.input_ids, cd.attention_mask, batch.pixel_values), lambda z, zb, s: vcd_icd(z, zb, 1.0, 0.1),
    )
    assert torch.equal(out.sequences[:, -STEPS:], ref_tokens)
    assert_scores_close(hallupatch.get_trace(model, "icd").contrasted, ref_scores)


def test_icd_instructions_and_helper():
    assert len(hallupatch.ICD_INSTRUCTIONS) == 5
    assert hallupatch.ICD_INSTRUCTIONS[0] == "You are an object detector to recognize every different objects."
    llava_v1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions. USER: <image>\nIs there a dog? ASSISTANT:")
    assert hallupatch.icd_prompt(llava_v1) == (hallupatch.ICD_INSTRUCTIONS[0] + " USER: <image>\nIs there a dog? ASSISTANT:")
    assert hallupatch.icd_prompt(llava_v1, 3).startswith(hallupatch.ICD_INSTRUCTIONS[3] + " USER:")
    with pytest.raises(ValueError, match="no system prompt"):
        hallupatch.icd_prompt("USER: hi ASSISTANT:")
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        hallupatch.icd_prompt(llava_v1, 5)


def test_m3id_greedy_matches_reference_with_t_starting_at_one(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    token = model.config.image_token_index
    model64 = double_copy(model)
    hallupatch.apply(model, "m3id", beta=0.1)
    out = model.generate(**batch, **GREEDY)
    bids, bmask = without_image(batch.input_ids, batch.attention_mask, token)
    ref_tokens, ref_scores = greedy(
        model64, STEPS, (batch.input_ids, batch.attention_mask, batch.pixel_values), (bids, bmask, None),
        lambda z, zb, s: m3id(z, zb, s + 1, 0.1),
    )
    assert torch.equal(out.sequences[:, -STEPS:], ref_tokens)
    assert_scores_close(hallupatch.get_trace(model, "m3id").contrasted, ref_scores)
    # t = 1 at the first token: weight exp(0.02) - 1, not 0
    trace = hallupatch.get_trace(model, "m3id")
    lc, lu = trace.main[0].double().log_softmax(-1), trace.branch[0].double().log_softmax(-1)
    assert not torch.allclose(trace.contrasted[0][torch.isfinite(trace.contrasted[0])].double(),
                              lc[torch.isfinite(trace.contrasted[0])])


@pytest.mark.parametrize("use_cfg,gamma", [(True, 1.1), (False, 1.1), (True, 2.0)])
def test_pai_greedy_matches_reference(llava, use_cfg, gamma):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    token = model.config.image_token_index
    layers = range(1, 5)
    model64 = double_copy(model)
    vanilla = model.generate(**batch, **GREEDY)
    hallupatch.apply(model, "pai", alpha=0.5, gamma=gamma, start_layer=1, end_layer=5, use_cfg=use_cfg)
    out = model.generate(**batch, **GREEDY)
    start = int((batch.input_ids[0] == token).nonzero()[0])
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    columns = list(range(start, start + patches ** 2))
    merged = batch.input_ids.shape[1] - 1 + patches ** 2
    bids, bmask = without_image(batch.input_ids, batch.attention_mask, token)
    ids, mask = batch.input_ids, batch.attention_mask
    for step in range(STEPS):
        rows = [merged + k - 1 for k in range(1, step + 1)] + ([] if use_cfg else [merged - 1])
        with amplified(model64, layers, rows, columns, 0.5):
            z = last_logits(model64, ids, mask, batch.pixel_values)
        z[:, model.generation_config.eos_token_id] = -float("inf")   # min_new_tokens, before PAI's processor
        want = pai_cfg(z, last_logits(model64, bids, bmask, None), gamma) if use_cfg else z
        assert out.sequences[0, ids.shape[1]].item() == want.argmax(-1).item()
        if use_cfg:
            assert_scores_close([out.scores[step]], [want])
        else:
            torch.testing.assert_close(out.scores[step].double(), want, rtol=1e-4, atol=1e-4)
        token_ = out.sequences[:, ids.shape[1]:ids.shape[1] + 1]
        ids, mask = torch.cat([ids, token_], 1), torch.cat([mask, torch.ones_like(token_)], 1)
        bids, bmask = torch.cat([bids, token_], 1), torch.cat([bmask, torch.ones_like(token_)], 1)
        if rows:   # the amplification matters: the same forward without it gives other logits
            plain = last_logits(model64, ids[:, :-1], mask[:, :-1], batch.pixel_values)
            assert not torch.allclose(plain[:, 3:], z[:, 3:], atol=1e-3)   # (eos, id 2, masked in z)
    if use_cfg:   # the first generated token is not amplified (published)
        assert torch.equal(hallupatch.get_trace(model, "pai").main[0], vanilla.scores[0])


def test_pai_gamma_one_is_log_softmax_and_no_amplification(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    vanilla = model.generate(**batch, **GREEDY)
    hallupatch.apply(model, "pai", gamma=1.0, start_layer=0, end_layer=6)
    out = model.generate(**batch, **GREEDY)
    assert torch.equal(out.sequences, vanilla.sequences)
    for ours, raw in zip(out.scores, vanilla.scores):
        torch.testing.assert_close(ours, raw.log_softmax(-1))
    assert hallupatch.get_trace(model, "pai").branch == []


@pytest.mark.parametrize("method,knobs", [("vcd", {"noise_seed": 4}), ("icd", {}), ("m3id", {}),
                                          ("pai", {"end_layer": 6})])
def test_batch_equals_samples_alone_and_remove_is_exact(llava, method, knobs):
    model, processor = llava
    vanilla = model.generate(**inputs(processor), **GREEDY)
    hallupatch.apply(model, method, **knobs)

    def run(texts, seeds):
        batch = inputs(processor, texts, seeds)
        extra = {}
        if method == "icd":
            cd = processor(text=[hallupatch.icd_prompt(t, 2, system=SYSTEM) if SYSTEM in t else "you " + t for t in texts],
                           return_tensors="pt", padding=True)
            extra = dict(input_ids_cd=cd.input_ids, attention_mask_cd=cd.attention_mask)
        if method == "vcd":   # one noise draw per sample, the same alone and in the batch
            extra = dict(images_cd=hallupatch.add_diffusion_noise(batch.pixel_values, 500, torch.Generator().manual_seed(seeds[0])))
        return model.generate(**batch, **extra, **GREEDY)

    if method == "vcd":
        both = inputs(processor)
        noisy = torch.cat([hallupatch.add_diffusion_noise(inputs(processor, [QUESTIONS[i]], [s]).pixel_values, 500,
                                                          torch.Generator().manual_seed(s)) for i, s in enumerate((1, 2))])
        batched = model.generate(**both, images_cd=noisy, **GREEDY)
    else:
        batched = run(QUESTIONS, (1, 2))
    for i, seed in enumerate((1, 2)):
        alone = run([QUESTIONS[i]], (seed,))
        assert torch.equal(batched.sequences[i, -STEPS:], alone.sequences[0, -STEPS:])
        for b, a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(b[i], a[0], rtol=1e-4, atol=1e-4)
    hallupatch.remove(model)
    again = model.generate(**inputs(processor), **GREEDY)
    assert torch.equal(again.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, vanilla.logits))


def test_copies_pickles_and_patched_context(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    hallupatch.apply(model, "m3id")
    first = model.generate(**batch, **GREEDY).sequences
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(other.generate(**batch, **GREEDY).sequences, first)
    hallupatch.remove(model)
    vanilla = model.generate(**batch, **GREEDY).sequences
    with hallupatch.patched(model, "m3id"):
        assert torch.equal(model.generate(**batch, **GREEDY).sequences, first)
    assert torch.equal(model.generate(**batch, **GREEDY).sequences, vanilla)


def test_bad_knobs_and_calls_are_refused(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    for method, knobs, match in [
        ("vcd", {"alpha": -1}, "alpha"), ("vcd", {"beta": 2}, "beta"), ("vcd", {"noise_step": 1000}, "noise_step"),
        ("vcd", {"noise_seed": -1}, "noise_seed"), ("m3id", {"lambda_decay": 0}, "lambda_decay"),
        ("pai", {"end_layer": 32}, "end_layer"), ("pai", {"start_layer": 3, "end_layer": 2}, "start_layer"),
        ("pai", {"use_attn": False, "use_cfg": False, "end_layer": 6}, "nothing"),
    ]:
        with pytest.raises(ValueError, match=match):
            hallupatch.apply(model, method, **knobs)
    with pytest.raises(TypeError, match="unknown knob"):
        hallupatch.apply(model, "icd", noise_step=3)
    with pytest.raises(ValueError, match="does not combine"):
        hallupatch.apply(model, "vcd+memvr")
    hallupatch.apply(model, "icd")
    with pytest.raises(ValueError, match="input_ids_cd"):
        model.generate(**batch, **GREEDY)
    with pytest.raises(ValueError, match="images_cd"):
        model.generate(**batch, images_cd=batch.pixel_values, **GREEDY)
    hallupatch.apply(model, "vcd")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**batch, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="cd_beta"):
        model.generate(**batch, cd_beta=3.0, **GREEDY)
    with pytest.raises(ValueError, match="shape"):
        model.generate(**batch, images_cd=batch.pixel_values[..., :28], **GREEDY)


def test_published_per_call_knobs_override(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    noisy = hallupatch.add_diffusion_noise(batch.pixel_values, 500, torch.Generator().manual_seed(1))
    hallupatch.apply(model, "vcd", alpha=0.3, beta=0.0)
    configured = model.generate(**batch, images_cd=noisy, **GREEDY)
    hallupatch.apply(model, "vcd")
    per_call = model.generate(**batch, images_cd=noisy, cd_alpha=0.3, cd_beta=0.0, **GREEDY)
    assert torch.equal(configured.sequences, per_call.sequences)
    for a, b in zip(configured.scores, per_call.scores):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the original LLaVA class
ORIGINAL = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True,
                return_dict_in_generate=True)


@pytest.fixture(scope="module")
def original_llava(tmp_path_factory):
    from test_stock_llava import StockLlavaLlamaForCausalLM
    from test_llama_family import saved_and_reloaded, tiny_llama_config

    path = tmp_path_factory.mktemp("original-llava")
    return saved_and_reloaded(StockLlavaLlamaForCausalLM(tiny_llama_config(mm_hidden_size=24)),
                              StockLlavaLlamaForCausalLM, path)


def original_prompt():
    ids = torch.tensor([[1, 12, -200, 40, 7, 9]])
    images = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(2))
    return ids, images


@pytest.mark.parametrize("method", ["vcd", "icd", "m3id"])
def test_original_llava_class_matches_reference(original_llava, method):
    model = original_llava
    ids, images = original_prompt()
    mask = torch.ones_like(ids)
    model64 = double_copy(model)
    hallupatch.apply(model, method)
    if method == "vcd":
        noisy = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
        out = model.generate(ids, images=images, images_cd=noisy, **ORIGINAL)
        branch, combine = (ids, mask, noisy), (lambda z, zb, s: vcd_icd(z, zb, 1.0, 0.1))
    elif method == "icd":
        ids_cd = torch.tensor([[1, 30, 31, 12, -200, 40, 7, 9]])
        out = model.generate(ids, images=images, input_ids_cd=ids_cd, **ORIGINAL)
        branch, combine = (ids_cd, torch.ones_like(ids_cd), images), (lambda z, zb, s: vcd_icd(z, zb, 1.0, 0.1))
    else:
        out = model.generate(ids, images=images, **ORIGINAL)
        text = ids[:, ids[0] != -200]
        branch, combine = (text, torch.ones_like(text), None), (lambda z, zb, s: m3id(z, zb, s + 1, 0.1))
    tokens, scores = greedy(model64, STEPS, (ids, mask, images), branch, combine, image_input="images")
    hallupatch.remove(model)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)   # the original generate returns the new tokens only


def test_original_llava_class_pai_matches_reference(original_llava):
    model = original_llava
    ids, images = original_prompt()
    model64 = double_copy(model)
    layers = range(1, 4)
    hallupatch.apply(model, "pai", alpha=0.5, start_layer=1, end_layer=4)
    out = model.generate(ids, images=images, **ORIGINAL)
    hallupatch.remove(model)
    columns, merged = list(range(2, 7)), ids.shape[1] - 1 + 5     # -200 at 2, 5 visual tokens
    text = ids[:, ids[0] != -200]
    seq, bseq = ids, text
    for step in range(STEPS):
        rows = [merged + k - 1 for k in range(1, step + 1)]
        with amplified(model64, layers, rows, columns, 0.5, decoder_layers=model64.model.layers):
            z = last_logits(model64, seq, None, images, "images")
        z[:, model.generation_config.eos_token_id] = -float("inf")   # min_new_tokens
        want = pai_cfg(z, last_logits(model64, bseq, torch.ones_like(bseq)), 1.1)
        assert out.sequences[0, step].item() == want.argmax(-1).item()
        assert_scores_close([out.scores[step]], [want])
        token = out.sequences[:, step:step + 1]
        seq, bseq = torch.cat([seq, token], 1), torch.cat([bseq, token], 1)


def test_published_extras_given_as_none_are_not_given(llava):
    model, processor = llava
    batch = inputs(processor, QUESTIONS[:1])
    hallupatch.apply(model, "m3id")
    plain = model.generate(**batch, **GREEDY)
    published = model.generate(**batch, images_cd=None, cd_alpha=None, cd_beta=None, **GREEDY)   # AvisC's call
    assert torch.equal(plain.sequences, published.sequences)
    with pytest.raises(ValueError, match=r"\['images_cd'\]"):
        model.generate(**batch, images_cd=batch.pixel_values, **GREEDY)
