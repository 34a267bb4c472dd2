"""EAGLE-2 dynamic draft trees over one EAGLE-3 drafter.

The tree is grown exactly as `decoding.eagle2` grows it (top_k best children per frontier node, the top_k best
children by cumulative draft log-probability as the next frontier, the best `total_tokens - 1` candidates kept;
`eagle2.select_tree`). What differs is what the drafter reads and where its words live:

- features: the concatenated target states entering three target layers (`taps`, `models.eagle3.aux_layers_for`),
  which the engine hands over instead of the last hidden state when a proposer declares `taps`; they go through the
  drafter's `fc` once, for the committed tokens. Deeper levels feed back the drafter's own output, without `fc`.
- vocabulary: the drafter scores its own draft vocabulary; `d2t` maps each pick to its target id. The target
  verifies over its full vocabulary, so decoding stays lossless at any draft vocabulary (greedy acceptance compares
  target argmaxes; the sampling rule uses target probabilities of deterministically chosen drafts).

The drafter's attention keys and values of accepted tokens persist between steps; a step's tree part is
concatenated level by level and dropped afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.eagle2 import select_tree
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import KV
from taps_bench.models.eagle3 import Eagle3Drafter, aux_layers_for, target_ids


class Eagle3Proposer:
    """Proposes EAGLE-2 trees from an EAGLE-3 drafter; `taps` tells the engine which target states it reads."""

    def __init__(self, drafter: Eagle3Drafter, target_model: Any, tree: TreeSettings, name: str = "drafter") -> None:
        self.name = name
        weight = target_model.lm_head.weight
        self.device = weight.device
        self.drafter = drafter.to(device=self.device, dtype=weight.dtype).eval()
        self.taps = aux_layers_for(drafter.config, int(target_model.config.num_hidden_layers))
        own = self.drafter.embed_tokens
        self.embed = (own.weight if own is not None else target_model.get_input_embeddings().weight).detach()
        self.d2t = self.drafter.d2t
        self.vocab = drafter.config.draft_vocab_size
        self.settings = tree
        self.past: KV | None = None  # keys and values of the accepted context only

    def reset(self) -> None:
        self.past = None

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}

    @property
    def _length(self) -> int:
        return 0 if self.past is None else self.past.length

    def _scores(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """Draft log-probabilities over the draft vocabulary [rows, V'] and their entropy [rows]."""
        logp = torch.log_softmax(self.drafter.logits(out), dim=-1)
        return logp, -(logp.exp() * logp).sum(-1)

    def _step(self, tokens: Tensor, hidden: Tensor, positions: Tensor, past: KV | None, mask: Tensor,
              from_target: bool) -> tuple[Tensor, KV]:
        return self.drafter(self.embed[tokens], hidden, positions, past, mask, from_target=from_target)

    def _advance(self, tokens: Tensor, features: Tensor, root: int) -> Tensor:
        """Consume the newly committed (features, next token) pairs into the drafter's cache; return the drafter's
        output at the last pair (whose next token is the root)."""
        next_tokens = torch.cat([tokens[1:].to(self.device), torch.tensor([root], device=self.device)])
        past, t = self._length, next_tokens.numel()
        positions = torch.arange(past, past + t, device=self.device)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=self.device).tril(past)
        out, new = self._step(next_tokens, features.to(self.device), positions, self.past, mask, from_target=True)
        self.past = new if self.past is None else self.past.cat(new)
        return out[-1:]

    @torch.inference_mode()
    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        s, dev = self.settings, self.device
        k = min(s.top_k, self.vocab)
        out = self._advance(tokens, hidden, root)
        base = self._length  # drafter position of the depth-1 nodes
        logp, entropy = self._scores(out)
        top = torch.topk(logp[0], k)
        frontier_tokens, frontier_score = target_ids(top.indices, self.d2t), top.values
        cand_tokens = [torch.tensor([root], device=dev), frontier_tokens]
        cand_parent = [torch.tensor([-1], device=dev), torch.zeros(k, dtype=torch.long, device=dev)]
        cand_score, cand_entropy = [torch.zeros(1, device=dev), frontier_score], [torch.zeros(1, device=dev),
                                                                                   entropy.expand(k)]
        n_cand, frontier_ids, frontier_hidden = 1 + k, torch.arange(1, 1 + k, device=dev), out.expand(k, -1)
        # As in eagle2: level l's k frontier nodes are the tree's KV slots l*k.., `ancestry[r]` marks row r's
        # expanded ancestors among them, and a level's mask is [context | ancestry | itself].
        tree_kv: KV | None = None
        ancestry = torch.zeros(k, 0, dtype=torch.bool, device=dev)
        eye = torch.eye(k, dtype=torch.bool, device=dev)
        context = torch.ones(k, base, dtype=torch.bool, device=dev)
        assert self.past is not None
        for level in range(s.depth):
            mask = torch.cat([context, ancestry, eye], dim=1)
            positions = torch.full((k,), base + level, device=dev)
            past = self.past if tree_kv is None else self.past.cat(tree_kv)
            out, new = self._step(frontier_tokens, frontier_hidden, positions, past, mask, from_target=False)
            tree_kv = new if tree_kv is None else tree_kv.cat(new)
            logp, entropy = self._scores(out)
            child = torch.topk(logp, k, dim=-1)
            child_score = (frontier_score[:, None] + child.values).reshape(-1)
            child_tokens = target_ids(child.indices.reshape(-1), self.d2t)
            cand_tokens.append(child_tokens)
            cand_parent.append(frontier_ids.repeat_interleave(k))
            cand_score.append(child_score)
            cand_entropy.append(entropy.repeat_interleave(k))
            if level + 1 == s.depth:
                break
            best = torch.topk(child_score, k).indices
            rows = torch.div(best, k, rounding_mode="floor")
            frontier_ids = n_cand + best
            frontier_tokens, frontier_score, frontier_hidden = child_tokens[best], child_score[best], out[rows]
            ancestry = torch.cat([ancestry[rows], eye[rows]], dim=1)
            n_cand += k * k
        return select_tree(torch.cat(cand_tokens), torch.cat(cand_parent), torch.cat(cand_score),
                       torch.cat(cand_entropy), s.total_tokens)
