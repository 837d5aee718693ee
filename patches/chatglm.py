"""ChatGLM family: GLM-4V-9b's ``ChatGLMForConditionalGeneration`` (the checkpoint's own
``modeling_chatglm.py`` or hallupatch's drop-in). Visual tokens = the output of ``transformer.vision``,
its begin/end-of-image rows included."""
from hallupatch.spec import FamilySpec, PassInfo, bind_call, register_family


def glm_real_positions(mask, prefill: bool):
    """Real (non-padding) positions of a pass from GLM's boolean mask (batch, 1, q, k), True = masked.

    ``None`` (no padding, or a decoding step, whose new token is always real). In a prefill, a real query
    row ``i < q-1`` cannot see the last key (causal) while a padding row sees everything; the last row is
    real when it masks something or when every earlier row is real (a single right-padding token leaves no
    trace in the mask; GLM-4V's tokenizer pads on the left).
    """
    if mask is None or not prefill:
        return None
    sees = ~mask[:, 0]                                   # (batch, q, k)
    real = ~sees[:, :, -1].clone()                       # rows before the last: blind to the last key
    earlier_real = real[:, :-1].all(dim=1)
    real[:, -1] = (~sees[:, -1].all(dim=1)) | earlier_real
    return real


def glm_pass_info(encoder, args, kwargs) -> PassInfo:
    """Read from ``transformer.encoder``'s call, which runs after the vision tower and the image merge."""
    call = bind_call(encoder, args, kwargs)
    hidden = call["hidden_states"]
    prefill = not call.get("kv_caches")
    return PassInfo(real_positions=glm_real_positions(call.get("attention_mask"), prefill), is_prefill=prefill,
                    batch_size=hidden.shape[0])


def glm_image_token_id(model) -> int:
    """``<boi>``, once per image."""
    return model.config.boi_token_id


CHATGLM = register_family(
    FamilySpec(
        name="chatglm",
        architectures=("ChatGLMForConditionalGeneration",),
        pass_start_paths=("transformer.encoder",),
        layers_paths=("transformer.encoder.layers",),
        final_norm_paths=("transformer.encoder.final_layernorm",),
        lm_head_paths=("transformer.output_layer",),
        visual_paths=("transformer.vision",),
        layer_signature=("self_attention.query_key_value", "post_attention_layernorm",
                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.dense_h_to_4h.weight",
        layer_ffn_out="mlp.dense_4h_to_h.weight",
        adapter_activation="silu",
        pass_info=glm_pass_info,
        final_hidden_normed=False,
        image_token_id=glm_image_token_id,
        method_defaults={
            "memvr": {"starting_layer": 9, "ending_layer": 16, "retracing_ratio": 0.28, "entropy_threshold": 0.75}
        },
    )
)
