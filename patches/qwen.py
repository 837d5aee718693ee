"""Qwen family: Qwen-VL-Chat's ``QWenLMHeadModel`` (the checkpoint's own ``modeling_qwen.py`` or
hallupatch's drop-in). Visual tokens = the output of ``transformer.visual`` (256 per image)."""
from hallupatch.spec import FamilySpec, PassInfo, bind_call, register_family


def qwen_pass_info(block, args, kwargs) -> PassInfo:
    """Read from the first block's call: Qwen encodes the images inside ``QWenModel.forward``, so the pass
    starts (and the visual memory is complete) when block 0 runs. Its additive mask (batch, 1, q, k) is 0
    exactly where the last query may attend: the real (non-padding) keys; the pass's keys are the last q."""
    call = bind_call(block, args, kwargs)
    hidden = call["hidden_states"]
    mask = call.get("attention_mask")
    real = None if mask is None else mask[:, 0, -1, -hidden.shape[1]:] == 0
    return PassInfo(real_positions=real, is_prefill=call.get("layer_past") is None, batch_size=hidden.shape[0])


def qwen_image_token_id(model) -> int:
    """``<img>``, once per image."""
    return model.config.visual["image_start_id"]


QWEN = register_family(
    FamilySpec(
        name="qwen",
        architectures=("QWenLMHeadModel",),
        pass_start_paths=("transformer.h.0",),
        layers_paths=("transformer.h",),
        final_norm_paths=("transformer.ln_f",),
        lm_head_paths=("lm_head",),
        visual_paths=("transformer.visual",),
        layer_signature=("attn.c_attn", "ln_2", "mlp.w1", "mlp.w2", "mlp.c_proj"),
        layer_ffn="mlp",
        layer_ffn_in="mlp.w1.weight",        # as the published MemVR code: w1 (up), c_proj (down)
        layer_ffn_out="mlp.c_proj.weight",
        adapter_activation="silu",
        pass_info=qwen_pass_info,
        image_token_id=qwen_image_token_id,
        method_defaults={
            "memvr": {"starting_layer": 9, "ending_layer": 16, "retracing_ratio": 0.28, "entropy_threshold": 0.75}
        },
    )
)
