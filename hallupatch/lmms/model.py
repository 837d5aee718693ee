"""The lmms-eval model ``hallupatch``: any checkpoint ``python -m hallupatch.eval`` loads, with any method.

    python -m lmms_eval --model hallupatch \\
        --model_args pretrained=PATH,method=memvr,starting_layer=0,ending_layer=5 --tasks mme --batch_size 8

Loading and prompting are hallupatch's own (:func:`hallupatch.eval.models.load_backend`: the checkpoint's
recipe picks the loader and the published conversation template); the lmms-eval task writes the question
(its pre- and post-prompt), which the recipe's template wraps as it is. So lmms-eval's ``mme`` and
``pope`` ask LLaVA-1.5 exactly what ``python -m hallupatch.eval mme`` asks it.

``model_args``: ``pretrained`` (checkpoint folder or hub name), ``method`` (``none``, ``memvr``, ``dola``,
``memvr+dola``, ...), ``recipe`` (default: from ``config.json``), ``dtype`` (float32, float16, bfloat16), and
the method's knobs (``retracing_ratio=0.2``; a list as JSON: ``candidate_layers=[16,18,20]``). A name
that is neither is an error that lists the valid ones. lmms-eval's ``--batch_size N`` and ``--device`` are
used as given; each batch is left-padded and every sample's answer equals its answer at batch size 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import hallupatch
from hallupatch.eval import models
from hallupatch.eval.data import Question
from hallupatch.eval.decoding import Decoding
from hallupatch.eval.harness import current_process

#: the model_args that are not method knobs
RUN_ARGS = ("pretrained", "method", "recipe", "dtype")
#: the generation_kwargs of an lmms-eval task that map onto hallupatch's decoding settings
GENERATION_KEYS = ("until", "max_new_tokens", "do_sample", "temperature", "top_p", "num_beams", "repetition_penalty")


def method_knob_names(method: str) -> List[str]:
    """The knobs ``method`` takes (``none``: no knobs); an unknown method is a ``ValueError``."""
    if method == "none":
        return []
    from hallupatch.methods import parse_method

    return [knob for m in parse_method(method) for knob in m.config_cls.knobs()]


def knob_value(value: Any) -> Any:
    """A knob as lmms-eval parsed it from ``model_args`` (numbers and booleans already converted); JSON
    lists and mappings (``[16,18,20]``, ``{"16": 0.4}``) are decoded, ``None`` spelled out is ``None``."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"model_args value {value!r} is not valid JSON ({err.msg}); "
                             "write lists as [16,18,20]") from None
    if isinstance(value, str) and value == "None":
        return None
    return value


def decoding_for(gen_kwargs: Mapping[str, Any]) -> Tuple[Decoding, Optional[int], List[str]]:
    """An lmms-eval task's ``generation_kwargs`` as ``(decoding, max_new_tokens, stop strings)``.

    Sampling when ``do_sample`` is true or ``temperature > 0`` (lmms-eval's models read a positive
    temperature as sampling); greedy otherwise, where temperature and top_p do not apply. Keys hallupatch
    does not use are logged, never silently dropped."""
    unused = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
    if unused:
        logger.warning(f"hallupatch: generation_kwargs {unused} are not used (it uses {list(GENERATION_KEYS)})")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = gen_kwargs.get("temperature") or 0
    sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
    decoding = Decoding(
        do_sample=sample,
        temperature=temperature if sample and temperature > 0 else None,
        top_p=gen_kwargs.get("top_p") if sample else None,
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        repetition_penalty=gen_kwargs.get("repetition_penalty"),
    )
    max_new_tokens = gen_kwargs.get("max_new_tokens")
    return decoding, int(max_new_tokens) if max_new_tokens else None, until


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class ContinuationScorer(LogitsProcessor):
    """Feeds each row's continuation to ``generate()`` token by token and scores it.

    At each step, the row's next continuation token gets the log-probability of the scores this processor
    receives (the method's output after transformers' own processors, before any warper: the distribution
    greedy decoding takes its argmax from), and is then forced. Rows whose continuation has ended are left
    alone (their later tokens are not read)."""

    def __init__(self, continuations: Sequence[Sequence[int]]):
        self.continuations = [list(c) for c in continuations]
        self.logprobs: List[List[float]] = [[] for _ in continuations]
        self.greedy = [True] * len(continuations)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        forced = scores.clone()
        for row, tokens in enumerate(self.continuations):
            if self.step >= len(tokens):
                continue
            token = tokens[self.step]
            self.logprobs[row].append(float(logprobs[row, token]))
            self.greedy[row] = self.greedy[row] and int(scores[row].argmax()) == token
            forced[row] = float("-inf")
            forced[row, token] = 0.0
        self.step += 1
        return forced


@dataclasses.dataclass(frozen=True)
class ScoringDecoding(Decoding):
    """Greedy decoding with a :class:`ContinuationScorer` as the last logits processor."""

    scorer: Optional[ContinuationScorer] = None

    def generate_kwargs(self) -> Dict[str, Any]:
        return {**super().generate_kwargs(), "logits_processor": LogitsProcessorList([self.scorer])}


class HallupatchLMM(lmms):
    """A hallupatch evaluation backend (:mod:`hallupatch.eval.models`) with a method applied, as an
    lmms-eval model. See the module docstring for ``model_args``."""

    is_simple = True

    def __init__(self, pretrained: Optional[str] = None, method: str = "none", recipe: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, batch_size: Any = 1,
                 max_batch_size: Any = None, **knobs: Any) -> None:
        super().__init__()
        if not pretrained:
            raise ValueError("the hallupatch model needs pretrained=PATH in --model_args (a checkpoint folder, "
                             "e.g. llava-hf/llava-1.5-7b-hf or hallupatch/lab/checkpoint)")
        method = str(method)
        valid_knobs = method_knob_names(method)
        unknown = sorted(set(knobs) - set(valid_knobs))
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for method={method}: the hallupatch model takes {list(RUN_ARGS)}"
                + (f" and {method}'s knobs {valid_knobs}" if valid_knobs else " (method=none has no knobs)"))
        if str(batch_size).startswith("auto") or max_batch_size is not None:
            raise ValueError("the hallupatch model needs a fixed --batch_size N (auto batch sizes are not supported)")
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"--batch_size must be >= 1; got {batch_size}")
        proc = current_process()  # several processes (accelerate launch): this one's rank and GPU
        self._rank, self._world_size = proc.rank, proc.world
        work_dir = Path(tempfile.gettempdir()) / f"hallupatch-lmms-{os.getpid()}"  # Qwen-VL reads images from files
        self.backend = models.load_backend(str(pretrained), recipe, device or proc.device, dtype, work_dir=work_dir)
        # the lmms-eval task writes the question (with its post-prompt); the recipe's template wraps it as it is
        self.backend.recipe = dataclasses.replace(self.backend.recipe, question_style="as_is")
        self.method = method
        self.knobs = {name: knob_value(value) for name, value in knobs.items()}
        if method != "none":
            hallupatch.apply(self.backend.model, method, **self.knobs)

    # -- what lmms-eval reads ---------------------------------------------------------------------
    @property
    def model(self):
        return self.backend.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def tokenizer(self):
        return getattr(self.backend, "tokenizer", None) or self.backend.processor.tokenizer

    # -- requests -> hallupatch questions ------------------------------------------------------------
    def _question(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> Question:
        """One request as a hallupatch :class:`Question` (one image; the context is the question)."""
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            kinds = [type(v).__name__ for v in visuals]
            raise ValueError(f"task {task}, document {doc_id}: the hallupatch model answers questions about one "
                             f"image; this request has {len(visuals)} visual(s) {kinds}")
        image = visuals[0]
        return Question(qid=f"{task}/{split}/{doc_id}", group=task, image_id=f"{task}_{split}_{doc_id}",
                        image_name=str(doc_id), question=context, answer="", image=lambda: image,
                        source=f"lmms-eval task {task}, {split} document {doc_id}")

    def _batches(self, requests: Sequence[Instance], key) -> List[List[int]]:
        """Request indices in batches of ``batch_size``, one ``key`` per batch, longest context first
        (less padding; the order does not change any answer)."""
        groups: Dict[str, List[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[key(request)].append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            batches += [indices[s:s + self.batch_size] for s in range(0, len(indices), self.batch_size)]
        return batches

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """Answers, batched (left padding): the recipe's prompt around each request's context, the method
        applied, the task's generation settings; the text is cut at the task's ``until`` strings."""
        answers: List[Optional[str]] = [None] * len(requests)
        batches = self._batches(requests, key=lambda r: json.dumps(r.args[1], sort_keys=True, default=str))
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="hallupatch answering")
        for batch in batches:
            decoding, max_new_tokens, until = decoding_for(requests[batch[0]].args[1])
            questions = []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                questions.append(self._question(context, doc_to_visual, doc_id, task, split))
            self.backend.decoding = decoding
            decoding.seed_everything()
            for i, out in zip(batch, self.backend.generate(questions, max_new_tokens)):
                answers[i] = cut_at_stop(out["text"], until)
            bar.update(len(batch))
        bar.close()
        return answers

    def _continuation_tokens(self, context: str, continuation: str) -> List[int]:
        """The continuation's tokens after the recipe's prompt for ``context``: the tokens of prompt +
        continuation past those of the prompt (a continuation that merges into the prompt's last token
        is an error)."""
        recipe = self.backend.recipe
        if recipe.template is None:
            raise NotImplementedError(f"loglikelihood needs the recipe's prompt template; recipe {recipe.name} "
                                      "prompts through the tokenizer's chat template: use generate_until tasks")
        prompt = recipe.template.format(question=context, image="image")  # the image path does not touch the tail
        head = self.tokenizer(prompt).input_ids
        full = self.tokenizer(prompt + continuation).input_ids
        if full[:len(head)] != head or len(full) == len(head):
            raise ValueError(f"continuation {continuation!r} does not tokenize as tokens after the prompt "
                             f"(it merges with the prompt's last token or is empty)")
        return full[len(head):]

    def loglikelihood(self, requests: List[Instance]) -> List[GenerationResult]:
        """``(loss, is_greedy)`` per request, in lmms-eval's convention: ``loss`` is the continuation's mean
        negative log-likelihood per token (lower = likelier; lmms-eval's multiple-choice scorer takes the
        argmin, as its llava_hf returns the model's loss), ``is_greedy`` whether greedy decoding would
        produce it. Each pair is wrapped in a ``GenerationResult`` (see below).

        With a method on, the probabilities are the method's: the prompt and image are prefilled as in
        ``generate()`` and the continuation is fed token by token (each a decoding step with the cache),
        so MemVR retraces and layer contrast contrasts exactly as when the model answers; each token's
        probability is the softmax of the scores greedy decoding would take its argmax from. Under layer
        contrast, a token outside the contrast's plausibility set has probability 0 (an infinite loss)."""
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="hallupatch scoring")
        for batch in self._batches(requests, key=lambda r: ""):
            questions, continuations = [], []
            for i in batch:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                questions.append(self._question(context, doc_to_visual, doc_id, task, split))
                continuations.append(self._continuation_tokens(context, str(continuation)))
            scorer = ContinuationScorer(continuations)
            self.backend.decoding = ScoringDecoding(scorer=scorer)
            self.backend.generate(questions, max(len(c) for c in continuations))
            for row, i in enumerate(batch):
                logprobs = scorer.logprobs[row]
                if len(logprobs) != len(continuations[row]):
                    raise RuntimeError(f"generation stopped after {len(logprobs)} of {len(continuations[row])} "
                                       "continuation tokens (an end-of-sequence token inside the continuation?)")
                # lmms-eval 0.7.3's evaluator turns any response that is neither text nor a GenerationResult into
                # its str() ("(0.1, True)"), which its multiple-choice scorer cannot unpack; a GenerationResult
                # passes its .text through unchanged
                results[i] = GenerationResult(text=(-sum(logprobs) / len(logprobs), scorer.greedy[row]))
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("the hallupatch model answers single-round tasks (generate_until, "
                                  "multiple_choice, loglikelihood)")
