"""An independent float64 plain-loop re-implementation of MemVR (DESIGN §4b) for LLaMA decoders.

Written for the tests from the design text alone: it shares no code with the library. It runs one
sample (no padding) through the decoder layers by hand, reading the entropy after every checked layer
and mixing the visual adapter into the next layer's feed-forward output.
"""
import copy
import math

import torch


def double_copy(language_model):
    """A float64 copy of a ``LlamaForCausalLM``."""
    return copy.deepcopy(language_model).double().eval()


def normalised_top10_entropy(logits):
    top = torch.sort(logits, descending=True).values[:10]
    p = torch.exp(top - top.max())
    p = p / p.sum()
    return float(-(p * torch.log(p)).sum() / math.log(10))


def memvr_reference(lm, embeds, memory, *, ratio, threshold, start, end, activation=lambda x: x):
    """Final logits ``(seq, vocab)`` and the trigger layer for one sample.

    ``lm``: float64 ``LlamaForCausalLM``; ``embeds``: ``(seq, hidden)`` input embeddings; ``memory``:
    ``(n_vis, hidden)`` visual tokens or ``None``. Returns ``(logits, trigger_layer, entropies)``.
    """
    return memvr_reference_decoder(lm.model, lm.lm_head, embeds, memory, ratio=ratio, threshold=threshold,
                                   start=start, end=end, activation=activation)


def memvr_reference_decoder(decoder, lm_head, embeds, memory, *, ratio, threshold, start, end, activation=lambda x: x):
    """:func:`memvr_reference` on any llama-structured float64 decoder (``.layers``, ``.norm``) and its LM head;
    ``embeds`` is what enters the first layer (Gemma's scaled embeddings, a VLM's merged sequence)."""
    seq = embeds.shape[0]
    h = embeds.double().unsqueeze(0)
    position_ids = torch.arange(seq).unsqueeze(0)
    mask = torch.full((seq, seq), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
    trigger, retrace_layer, entropies = None, None, {}
    for index, layer in enumerate(decoder.layers):
        residual = h
        attn = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_ids=position_ids)[0]
        h = residual + attn
        x = layer.post_attention_layernorm(h)
        f = layer.mlp(x)
        if index == retrace_layer:
            z = memory.double()
            s_k = layer.mlp.up_proj.weight.abs().mean() / z.abs().mean()
            s_v = layer.mlp.down_proj.weight.abs().mean() / z.abs().mean()
            a = activation(x[0] @ (s_k * z).T) @ (s_v * z)
            f = (1 - ratio) * f + ratio * (f.abs().mean() / a.abs().mean()) * a
        h = h + f
        if memory is not None and trigger is None and start < index < end:
            logits = lm_head(decoder.norm(h[0, -1]))
            entropies[index] = normalised_top10_entropy(logits)
            if entropies[index] > threshold:
                trigger, retrace_layer = index, index + 1
    return lm_head(decoder.norm(h))[0], trigger, entropies


def llava_inputs_embeds(model, input_ids, pixel_values):
    """float64 input embeddings of one llava-hf sample: the ``<image>`` token replaced by its
    projected visual tokens (CLIP's penultimate layer without CLS, as llava-1.5 selects them)."""
    double = copy.deepcopy(model).double()
    vision = double.vision_tower(pixel_values.double(), output_hidden_states=True)
    visual = double.multi_modal_projector(vision.hidden_states[model.config.vision_feature_layer][:, 1:])
    text = double.get_input_embeddings()(input_ids)
    pieces, image = [], 0
    for position, token in enumerate(input_ids.tolist()):
        if token == model.config.image_token_index:
            pieces.append(visual[image])
            image += 1
        else:
            pieces.append(text[position:position + 1])
    memory = torch.cat([visual[i] for i in range(image)]) if image else None
    return torch.cat(pieces), memory


def memvr_reference_hooks(model, parts, inputs, memory, *, ratio, threshold, start, end, activation=lambda x: x):
    """MemVR on one unpadded sample of a float64 model whose layers cannot be run by hand (the remote-code
    families): the model's own forward runs, and this function's hooks read the entropy after each checked
    layer and mix the adapter into the next layer's feed-forward output, as DESIGN 4b says.

    ``parts``: ``layers``, ``norm``, ``head`` and ``w_in(layer)`` / ``w_out(layer)``; ``inputs``: the model's
    keyword arguments (batch 1). Returns ``(logits, trigger_layer, entropies)`` as :func:`memvr_reference`.
    """
    state = {"trigger": None}
    entropies = {}

    def after_layer(index):
        def hook(module, args, output):
            if memory is None or state["trigger"] is not None:
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            entropies[index] = normalised_top10_entropy(parts.head(parts.norm(hidden[0, -1])))
            if entropies[index] > threshold:
                state["trigger"] = index
            return None
        return hook

    def in_ffn(index):
        def hook(module, args, output):
            if state["trigger"] != index - 1:
                return None
            x, f, layer, z = args[0][0], output[0], parts.layers[index], memory.double()
            s_k = parts.w_in(layer).abs().mean() / z.abs().mean()
            s_v = parts.w_out(layer).abs().mean() / z.abs().mean()
            a = activation(x @ (s_k * z).T) @ (s_v * z)
            mixed = output.clone()
            mixed[0] = (1 - ratio) * f + ratio * (f.abs().mean() / a.abs().mean()) * a
            return mixed
        return hook

    handles = []
    for index in range(start + 1, end):
        handles.append(parts.layers[index].register_forward_hook(after_layer(index)))
        handles.append(parts.mlp(parts.layers[index + 1]).register_forward_hook(in_ffn(index + 1)))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, state["trigger"], entropies
