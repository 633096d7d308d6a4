"""DETR's post-norm transformer: encoder over image features, decoder over object queries.

Tensors are batch-first here, ``(B, S, C)``; parameter names follow the original DETR
(``self_attn.in_proj_weight``, ``linear1``, ``norm1`` ...) so its checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DetrConfig


class MultiheadAttention(nn.Module):
    """Multi-head attention with a packed ``in_proj`` (DETR's layout) on top of SDPA.

    Unlike ``nn.MultiheadAttention`` it takes queries and keys that differ from the values
    (DETR adds position encodings to queries and keys only) without leaving the fused kernel.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: Tensor[B, L, C]; key, value: Tensor[B, S, C].
            key_mask: optional bool Tensor[B, S], True on keys that may be attended (real pixels).
        Returns:
            Tensor[B, L, C].
        """
        batch, length, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            # (B, S, C) -> (B, heads, S, C / heads)
            return F.linear(x, weight, bias).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        dim, ffn = config.hidden_dim, config.dim_feedforward
        self.self_attn = MultiheadAttention(dim, config.num_heads, config.dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, mask)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DecoderLayer(nn.Module):
    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        dim, ffn = config.hidden_dim, config.dim_feedforward
        self.self_attn = MultiheadAttention(dim, config.num_heads, config.dropout)
        self.multihead_attn = MultiheadAttention(dim, config.num_heads, config.dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt)))
        attended = self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, mask)
        tgt = self.norm2(tgt + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class Encoder(nn.Module):
    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, mask, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.norm = nn.LayerNorm(config.hidden_dim)

    def forward(
        self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor, all_layers: bool
    ) -> Tensor:
        """Returns Tensor[L, B, Q, C]: every layer's normalized output (auxiliary losses), or
        only the last one (L = 1) when ``all_layers`` is False."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
            if all_layers:
                outputs.append(self.norm(tgt))
        return torch.stack(outputs) if all_layers else self.norm(tgt)[None]


class Transformer(nn.Module):
    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor, all_layers: bool) -> Tensor:
        """
        Args:
            src: Tensor[B, C, h, w], projected backbone features.
            mask: bool Tensor[B, h, w], True on real positions.
            query_embed: Tensor[Q, C], learned query positions.
            pos: Tensor[B, C, h, w], position encoding.
            all_layers: return every decoder layer's output (training) or the last only.
        Returns:
            Tensor[L, B, Q, C] decoder outputs.
        """
        src = src.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)
        pos = pos.flatten(2).transpose(1, 2).to(src.dtype)
        mask = mask.flatten(1)  # (B, hw)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)  # (B, Q, C)
        memory = self.encoder(src, mask, pos)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, mask, pos, query_pos, all_layers)
