"""An independent float64 re-computation of the two-branch baselines (DESIGN §4e): a plain loop of main and
branch forwards over the whole sequence, no cache, written from the published formulas, sharing no code
with hallupatch.methods. PAI's amplification is applied inside transformers' own eager attention by
intercepting its softmax in the amplified layers, on the rows that an amplified pass processed."""
import contextlib
import copy
import math

import torch
import torch.nn.functional as F


def double_copy(model):
    return copy.deepcopy(model).double().eval()


def positions(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def last_logits(model64, ids, mask, image=None, image_input="pixel_values"):
    """Last-position logits of one full forward, no cache, float64."""
    kwargs = {image_input: image.double()} if image is not None else {}
    if image_input == "images":   # the original LLaVA class: its forward splices the image in, no padding
        out = model64(input_ids=ids, use_cache=False, **kwargs)
        return out.logits[:, -1].double()
    out = model64(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **kwargs)
    return out.logits[:, -1].double()


def vcd_icd(main, branch, alpha, beta):
    out = (1 + alpha) * main - alpha * branch
    cutoff = math.log(beta) + main.max(-1, keepdim=True).values if beta > 0 else torch.full_like(main[:, :1], -math.inf)
    return out.masked_fill(main < cutoff, -math.inf)


def m3id(main, branch, t, beta, lam=0.02):
    gamma = math.exp(-lam * t)
    lc, lu = main.log_softmax(-1), branch.log_softmax(-1)
    out = lc + (1 - gamma) / gamma * (lc - lu)
    cutoff = math.log(beta) + main.max(-1, keepdim=True).values if beta > 0 else torch.full_like(main[:, :1], -math.inf)
    return out.masked_fill(main < cutoff, -math.inf)


def pai_cfg(scores, branch, gamma):
    lp, lu = scores.log_softmax(-1), branch.log_softmax(-1)
    out = gamma * (lp - lu) + lu
    return out.masked_fill(lp < math.log(0.1) + lp.max(-1, keepdim=True).values, -math.inf)


def diffusion(x, eps, step):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[step]
    return abar.sqrt() * x.double() + (1 - abar).sqrt() * eps.double()


def greedy(model64, steps, main, branch, combine, image_input="pixel_values"):
    """``main`` / ``branch``: (ids, mask, image); ``combine(main_logits, branch_logits, step)``. Returns the
    generated tokens (batch, steps) and the contrasted scores per step."""
    return greedy_loop(lambda ids, mask, image: last_logits(model64, ids, mask, image, image_input),
                       steps, main, branch, combine)


def greedy_loop(logits, steps, main, branch, combine, first_step=0, banned=()):
    """The plain loop itself: ``logits(ids, mask, image)`` gives one full forward's last-position logits;
    ``main`` / ``branch``: (ids, mask, image); ``combine(main_logits, branch_logits, step)`` with ``step``
    counted from ``first_step``; ``banned`` token ids are -inf in every step's scores (as min_new_tokens
    does to EOS). Both branches are fed the chosen token and re-run in full at every step."""
    (ids, mask, image), (bids, bmask, bimage) = main, branch
    tokens, scores = [], []
    for step in range(first_step, first_step + steps):
        out = combine(logits(ids, mask, image), logits(bids, bmask, bimage), step)
        out[:, list(banned)] = -math.inf
        token = out.argmax(-1, keepdim=True)
        tokens.append(token)
        scores.append(out)
        one = torch.ones_like(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, one], 1)
        bids, bmask = torch.cat([bids, token], 1), torch.cat([bmask, one], 1)
    return torch.cat(tokens, 1), scores


@contextlib.contextmanager
def amplified(model64, layers, rows, columns, alpha, decoder_layers=None):
    """Inside: transformers' eager attention in ``layers`` gets ``w + alpha |w|`` on ``columns`` of the
    query ``rows`` (absolute positions of a full, uncached forward, batch 1)."""
    active = []
    original = F.softmax

    def softmax(x, dim=None, dtype=None, **kw):
        if active and x.dim() == 4 and rows:
            x = x.clone()
            for r in rows:
                if r < x.shape[2]:
                    w = x[:, :, r, columns]
                    x[:, :, r, columns] = w + alpha * w.abs()
        return original(x, dim=dim, dtype=dtype, **kw)

    handles = []
    for i in layers:
        attn = (decoder_layers or model64.language_model.model.layers)[i].self_attn
        handles.append(attn.register_forward_pre_hook(lambda m, a: active.append(1) and None))
        handles.append(attn.register_forward_hook(lambda m, a, o: active.pop() and None))
    F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = original
        for h in handles:
            h.remove()
