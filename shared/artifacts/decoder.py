"""A small GPT-style decoder-only causal language model and greedy decoding for streaming."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional

from shared.artifacts.nets import check_token_ids

__all__ = ["DecoderLM", "greedy_generate"]


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        )
        # is_causal builds the mask on the fly, so no mask buffer has to live in the state dict.
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DecoderLM(nn.Module):
    """Pre-norm transformer decoder with learned positions and an untied LM head.

    The head is deliberately not tied to the token embedding: tied parameters share storage, which
    safetensors refuses to save, and the saving convenience is worth a few parameters.

    Attributes:
        vocab_size: Number of token ids (256 for byte-level text).
        context: Longest sequence the model attends over.
    """

    def __init__(self, vocab_size: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.vocab_size, self.context = vocab_size, context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2 initialisation: the torch defaults give logits far too large for a softmax over the vocab.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Maps token ids ``[batch, length <= context]`` to next-token logits ``[batch, length, vocab]``."""
        check_token_ids(input_ids, self.vocab_size)
        if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= self.context:
            raise ValueError(
                f"input_ids must have shape [batch, length] with 1 <= length <= {self.context}, "
                f"got {list(input_ids.shape)}"
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def greedy_generate(
    model: DecoderLM, ids: Sequence[int] | torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> Iterator[int]:
    """Returns an iterator over greedily decoded token ids, one at a time, for streaming responses.

    Each step re-runs the model over the last ``model.context`` tokens (no KV cache): simple, and cheap
    at the sizes the zoo builds. Inference mode is entered per step rather than around the loop
    because a generator suspended inside the context manager would leak inference mode into the
    caller's code between yields.

    Args:
        model: A decoder LM (any module with ``context`` and ``vocab_size`` and the same forward).
        ids: The prompt: a non-empty sequence of token ids, or a tensor of shape ``[n]`` or ``[1, n]``.
        max_new_tokens: How many tokens to generate at most (>= 0).
        eos_id: If given, stop right after yielding this token.

    Returns:
        An iterator yielding each new token id as a Python int. Arguments are checked at call time,
        before the first token is requested.

    Raises:
        ValueError: If the prompt is empty, batched, or holds ids outside the vocabulary, or if
            ``max_new_tokens`` is negative.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"prompt must have shape [n] or [1, n], got {list(ids.shape)}")
        tokens = [int(t) for t in ids.tolist()]
    else:
        tokens = [int(t) for t in ids]
    if not tokens:
        raise ValueError("prompt must hold at least one token id")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_token_ids(torch.tensor(tokens), model.vocab_size)
    # Validation above runs at call time; only the decoding loop below is lazy.
    return _decode(model, tokens, max_new_tokens, eos_id)


def _decode(model: DecoderLM, tokens: list[int], max_new_tokens: int, eos_id: int | None) -> Iterator[int]:
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-model.context :]], dtype=torch.int64, device=device)
        with torch.inference_mode():
            next_id = int(model(window)[0, -1].argmax())
        tokens.append(next_id)
        yield next_id
        if next_id == eos_id:
            return
