"""Sampling with a KV cache kept across the turns of a group of conversations (no repeated prefill).

Today's way to sample a multi-turn group is one HF ``generate`` per turn, which prefills every row's whole
conversation again each turn; the G rows of a group even share the same opening. :class:`CachedRows` keeps one
KV cache for the group instead:

* :meth:`CachedRows.start`: each distinct opening is prefilled once and its cache repeated to its G rows; the
  prefix several openings share (a system prompt) once for all of them.
* :meth:`CachedRows.extend`: a later turn prefills only each row's tokens added since the cache last saw it
  (the last sampled token, the observation and the template text around it); rows of very uneven chunks go
  through forwards of similar length (:func:`length_buckets`), so one long observation does not make every row
  compute padding.
* :meth:`CachedRows.step`: one decode step, one token per row (on CPU with grouped-query attention that reads
  the cache in place, :mod:`lit_echo.online.attention`).
* :meth:`CachedRows.keep`: finished rows leave the cache.

Rows have different lengths. The cache is one tensor per layer ``[n, heads, C, head_dim]`` whose C columns are
shared by all rows; a row's tokens sit in increasing columns with padding wherever the row had nothing to add
(its chunk was shorter than another row's, or it had already ended its turn while others decoded). A 2D
attention mask ``[n, C]`` hides the padding columns and explicit ``position_ids`` give every real token its
position in its own conversation, so each row computes exactly what it would alone (up to float rounding of
the batched kernels): the same scheme as left padding in ``generate``, applied to every chunk.

:func:`sample_tokens` draws the next tokens. It consumes the random stream exactly like HF's sampling
(``torch.multinomial(probs, 1)``, which draws one exponential variate per vocabulary entry and row and takes
``argmax(probs / noise)``), so with the same seed both ways pick the same ids from the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from lit_echo.models import _causal_lm, _check_plain_output_head, decoder, output_head
from lit_echo.online.attention import decode_attention, use_grouped_decode


def kv_reuse_supported(model) -> bool:
    """Whether :class:`CachedRows` can drive ``model``: every cache layer is a plain growing
    ``DynamicLayer`` (sliding-window, linear-attention and other special caches are not column-aligned), and its
    logits are ``lm_head(hidden)`` (no soft-capping or logit scale, which only the model's own forward applies)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    causal_lm = _causal_lm(model)
    try:
        _check_plain_output_head(causal_lm)
        output_head(model)
    except (NotImplementedError, TypeError):
        return False
    cache = DynamicCache(config=causal_lm.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def nucleus_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` ``[n, V]`` with every token outside the top-p nucleus set to ``-inf``.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``; in ascending
    order, a token is dropped while the cumulative probability up to and including it is ``<= 1 - top_p``, and
    the most likely token is always kept (the rule of HF's ``TopPLogitsWarper``, so both paths cut alike).
    """
    ascending, order = torch.sort(scores, descending=False)  # [n, V]
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [n, V]
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns ``(ids [n], logprobs [n])``.

    ``logits``: ``[n, V]`` float32 raw logits. ``noise``: ``[n, V]`` standard exponential variates (see the
    module docstring). The token is drawn from ``softmax(logits / temperature)``, renormalised to the top-p
    nucleus when ``top_p < 1``; its stored log-prob is ``log_softmax(logits / temperature)[id]``, the
    un-truncated distribution the trainer recomputes.
    """
    scaled = logits / temperature  # [n, V]
    weights = scaled if top_p >= 1.0 else nucleus_filter(scaled, top_p)
    ids = (torch.softmax(weights, dim=-1) / noise).argmax(dim=-1)  # [n]
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, ids[:, None]).squeeze(1)  # [n]
    return ids, logprobs


def exponential_noise(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` standard exponential variates from the default generator (what multinomial draws)."""
    return torch.empty((rows, vocab), dtype=torch.float32, device=device).exponential_()


def length_buckets(lengths: Sequence[int], split_cost: int) -> list[tuple[list[int], int]]:
    """Rows grouped into forwards that compute the fewest positions: ``[(row indices, width), ...]``.

    A forward over rows ``R`` computes ``len(R) * max(lengths[R])`` positions, plus ``split_cost`` for each forward
    after the first. Buckets are contiguous runs of the rows sorted by length (an optimal grouping has that form);
    found by dynamic programming over the sorted lengths, O(n^2).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest grouping of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + (split_cost if i > 0 else 0)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets = []
    j = n
    while j > 0:
        i = cut[j]
        buckets.append(([order[k] for k in range(i, j)], sorted_lengths[j - 1]))
        j = i
    return buckets[::-1]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


class CachedRows:
    """A batch of conversations with one KV cache (see the module docstring).

    Args:
        model: a causal LM (a ``peft`` model or a plain HF one) in eval mode; call everything under
            ``torch.no_grad()``.
        pad_token_id: the id fed at padding positions (masked out, any id works).
        grouped_decode: run the one-token decode steps with :func:`lit_echo.online.attention.grouped_attention`
            (no copy of the KV cache per step); None: on CPU with ``sdpa``/``eager`` models
            (:func:`~lit_echo.online.attention.use_grouped_decode`). Prefill chunks keep the model's attention.

    Attributes: ``lengths`` (tokens of each row the cache holds), ``prefill_tokens`` (positions run through
    multi-token forwards, padding included: what the machine computed).
    """

    #: Prefill positions one extra forward is worth (weights read once more, per-op overhead): see :meth:`extend`.
    split_cost = 64

    def __init__(self, model, pad_token_id: int, grouped_decode: bool | None = None):
        from transformers import DynamicCache

        self.model = model
        self.body, self.head = decoder(model), output_head(model)
        self.grouped_decode = use_grouped_decode(model) if grouped_decode is None else grouped_decode
        self.pad_token_id = pad_token_id
        self.device = model.get_input_embeddings().weight.device
        self.cache = DynamicCache(config=_causal_lm(model).config)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [n, C]: 1 for real tokens
        self.lengths: list[int] = []
        self.prefill_tokens = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` ``[n, W]`` after the cached columns; the next-token logits ``[n, V]`` (float32)
        at each row's last column."""
        self.mask = torch.cat([self.mask, new_mask], dim=1)  # [n, C + W]
        return self._last_logits(input_ids, self.mask, positions, self.cache)

    def _last_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache
                     ) -> torch.Tensor:
        """The decoder over ``input_ids`` ``[b, W]`` after ``cache`` (``mask`` ``[b, C + W]``), then the head on
        the last position only, as a 2-D matmul: the model's own ``logits_to_keep=1`` hands the head a strided
        [b, 1, H] slice, which CPU matmul serves by copying the head's weight b times (0.9 s of a 1.3 s chunk of
        8 x 20 tokens with SmolLM2's 49k-token head). Returns float32 logits ``[b, V]``."""
        out = self.body(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True)
        return self.head(out.last_hidden_state[:, -1]).float()  # [b, V]

    def start(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill the rows' prompts into an empty cache; the next-token logits ``[n, V]``.

        Rows that come in equal runs of one prompt (the G rows of each group of
        ``GroupGenerator.generate_groups``) are prefilled once per distinct prompt and the cache repeated to the
        run. Among the distinct prompts, the
        longest prefix all share (all but at least each prompt's last token) is run once and its cache repeated;
        the rest of each prompt goes through :meth:`extend`.
        """
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        repeat = len(prompts) // len(distinct)
        if repeat > 1 and len(distinct) * repeat == len(prompts) \
                and all(tuple(p) == distinct[i // repeat] for i, p in enumerate(prompts)):
            logits = self._start(distinct)  # [d, V]
            self.cache.batch_repeat_interleave(repeat)
            self.mask = self.mask.repeat_interleave(repeat, dim=0)  # [n, C]
            self.lengths = [length for length in self.lengths for _ in range(repeat)]
            return logits.repeat_interleave(repeat, dim=0)  # [n, V]
        return self._start(prompts)

    def _start(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("CachedRows.start: the cache already holds rows")
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if shared > 0:
            self.mask = torch.zeros((1, 0), dtype=torch.long, device=self.device)
            ids = torch.tensor([list(prompts[0][:shared])], dtype=torch.long, device=self.device)  # [1, S]
            positions = torch.arange(shared, device=self.device)[None]  # [1, S]
            self._forward(ids, torch.ones_like(ids), positions)
            self.prefill_tokens += shared
            self.cache.batch_repeat_interleave(len(prompts))
            self.mask = self.mask.expand(len(prompts), -1).contiguous()  # [n, S]
        else:
            self.mask = torch.zeros((len(prompts), 0), dtype=torch.long, device=self.device)
        self.lengths = [max(shared, 0)] * len(prompts)
        return self.extend([p[shared:] for p in prompts])

    def extend(self, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append one chunk of tokens (at least one) to every row, left-padded to the longest; the logits
        ``[n, V]`` after each row's last token.

        Rows whose chunks are much shorter than the longest (one row's long observation) would spend most of the
        forward on padding; :func:`length_buckets` splits the rows into forwards of similar chunk lengths when
        that computes fewer positions (counting :attr:`split_cost` per extra forward). The cache layout, and so
        every later step, is the same either way.
        """
        if len(chunks) != self.rows:
            raise ValueError(f"CachedRows.extend: {len(chunks)} chunks for {self.rows} rows")
        if any(len(c) == 0 for c in chunks):
            raise ValueError("CachedRows.extend: every row needs at least one new token")
        width = max(len(c) for c in chunks)
        ids = torch.full((self.rows, width), self.pad_token_id, dtype=torch.long)  # [n, W]
        new_mask = torch.zeros((self.rows, width), dtype=torch.long)  # [n, W]
        positions = torch.zeros((self.rows, width), dtype=torch.long)  # [n, W]
        for i, chunk in enumerate(chunks):
            start = width - len(chunk)
            ids[i, start:] = torch.tensor(list(chunk), dtype=torch.long)
            new_mask[i, start:] = 1
            positions[i, start:] = torch.arange(self.lengths[i], self.lengths[i] + len(chunk))
            self.lengths[i] += len(chunk)
        ids, new_mask, positions = ids.to(self.device), new_mask.to(self.device), positions.to(self.device)
        buckets = length_buckets([len(c) for c in chunks], self.split_cost)
        if len(buckets) == 1 or self.mask.shape[1] == 0 or not all(layer.is_initialized for layer in self.cache.layers):
            self.prefill_tokens += self.rows * width
            return self._forward(ids, new_mask, positions)
        return self._forward_buckets(buckets, ids, new_mask, positions)

    def _forward_buckets(self, buckets: list[tuple[list[int], int]], ids: torch.Tensor, new_mask: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
        """:meth:`extend`'s forward, one per bucket of rows, each on a copy of its rows' cache and only as wide as
        its longest chunk; the new columns are merged back right-aligned (padding columns zero and masked)."""
        from transformers import DynamicCache

        rows, columns = self.mask.shape  # n, C
        width = ids.shape[1]
        old = [(layer.keys, layer.values) for layer in self.cache.layers]  # [n, heads, C, head_dim] each
        merged = [(k.new_zeros(rows, k.shape[1], columns + width, k.shape[3]),
                   v.new_zeros(rows, v.shape[1], columns + width, v.shape[3])) for k, v in old]
        logits = None
        for members, bucket_width in buckets:
            index = torch.tensor(members, dtype=torch.long, device=self.device)
            cache = DynamicCache(config=_causal_lm(self.model).config)
            for layer_index, (k, v) in enumerate(old):
                cache.update(k[index], v[index], layer_index)
            cut = width - bucket_width  # the bucket's chunks are right-aligned in the last bucket_width columns
            bucket_logits = self._last_logits(ids[index, cut:],
                                              torch.cat([self.mask[index], new_mask[index, cut:]], dim=1),
                                              positions[index, cut:], cache)  # [b, V]
            if logits is None:
                logits = bucket_logits.new_empty(rows, bucket_logits.shape[1])
            logits[index] = bucket_logits
            for (k, v), layer in zip(merged, cache.layers):
                k[index, :, columns + cut:] = layer.keys[:, :, columns:]
                v[index, :, columns + cut:] = layer.values[:, :, columns:]
            self.prefill_tokens += len(members) * bucket_width
        for (k, v), (old_k, old_v), layer in zip(merged, old, self.cache.layers):
            k[:, :, :columns] = old_k
            v[:, :, :columns] = old_v
            layer.keys, layer.values = k, v
        self.mask = torch.cat([self.mask, new_mask], dim=1)  # [n, C + W]
        return logits

    def step(self, tokens: torch.Tensor, active: Sequence[bool]) -> torch.Tensor:
        """Feed ``tokens`` ``[n]`` (one per row; rows not ``active`` get a masked padding column); the logits
        ``[n, V]``."""
        active_mask = torch.tensor([int(a) for a in active], dtype=torch.long)  # [n]
        ids = torch.where(active_mask.bool(), tokens.cpu(), self.pad_token_id)[:, None]  # [n, 1]
        positions = torch.tensor([[length if a else 0] for length, a in zip(self.lengths, active)])  # [n, 1]
        self.lengths = [length + int(a) for length, a in zip(self.lengths, active)]
        with decode_attention(self.model) if self.grouped_decode else contextlib.nullcontext():
            return self._forward(ids.to(self.device), active_mask[:, None].to(self.device),
                                 positions.to(self.device))

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in order); columns no remaining row uses are dropped too."""
        rows = list(rows)
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths = [self.lengths[i] for i in rows]
        used = self.mask.any(dim=0)  # [C]
        if not bool(used.all()):
            # Plain DynamicLayers (kv_reuse_supported) store [n, heads, C, head_dim] tensors.
            for layer in self.cache.layers:
                if not layer.is_initialized or layer.keys.numel() == 0:
                    continue
                layer.keys = layer.keys[:, :, used]
                layer.values = layer.values[:, :, used]
            self.mask = self.mask[:, used]
