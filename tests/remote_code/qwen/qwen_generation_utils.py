from typing import List, Tuple

import torch
from transformers import LogitsProcessor

HistoryType = List[Tuple[str, str]]


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    turns = [f"<|im_start|>system\\n{system}<|im_end|>"]
    for old_query, response in history or []:
        turns += [f"<|im_start|>user\\n{old_query}<|im_end|>", f"<|im_start|>assistant\\n{response}<|im_end|>"]
    turns += [f"<|im_start|>user\\n{query}<|im_end|>", "<|im_start|>assistant\\n"]
    raw_text = "\\n".join(turns)
    return raw_text, tokenizer.encode(raw_text)


def get_stop_words_ids(chat_format, tokenizer):
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def decode_tokens(tokens, tokenizer, raw_text_len, context_length, chat_format, verbose=False, errors="replace"):
    tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
    new = tokens[context_length:]
    for stop in (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id):
        if stop in new:
            new = new[:new.index(stop)]
    return tokenizer.decode(new, errors=errors).strip()


class StopWordsLogitsProcessor(LogitsProcessor):
    def __init__(self, stop_words_ids, eos_token_id):
        self.stop_words_ids = [list(ids) for ids in stop_words_ids if len(ids)]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            if any(ids[-len(stop):] == stop for stop in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2 ** 15)
        return scores
