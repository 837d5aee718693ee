"""Stand-in for Qwen-VL's visual.py: same constructor, key names and output shape (n, 256, output_dim)."""
from collections import OrderedDict

import torch
from torch import nn


class VisualAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        n, s, w = x.shape
        q, k, v = (t.view(n, s, self.heads, -1).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, w))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    def __init__(self, n_queries, embed_dim, kv_dim):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n_queries, embed_dim) * 0.02, requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, max(1, embed_dim // 128), batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, n_queries=256, output_dim=512,
                 **kwargs):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(n_queries, output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def forward(self, x):
        x = x.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + self.positional_embedding[: x.shape[1]])
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj

    def encode(self, image_paths):
        from PIL import Image

        images = []
        for path in image_paths:
            image = Image.open(path).convert("RGB").resize((self.image_size, self.image_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255.0
            images.append((pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1) - 0.5) / 0.25)
        return self(torch.stack(images))
