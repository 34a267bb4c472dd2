"""The single-drafter proposer: EAGLE-2 dynamic draft trees over one EAGLE-format drafter.

Drafting (EAGLE-2, Li et al. 2024): the first level takes the `top_k` best next tokens under the root; then, `depth`
times, every frontier node proposes its own `top_k` children, and only the `top_k` children with the best cumulative
draft log-probability become the next frontier. Every child stays a candidate. Finally the best `total_tokens - 1`
candidates by cumulative log-probability form the tree (sorting by (score, creation order) keeps it closed under
ancestors, since a child never scores above its parent). So the tree has up to depth + 1 drafted levels, as in the
EAGLE-2 code that the paper's `depth=5` refers to; `top_k=1` gives a chain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import KV, Drafter, vocab_head


class EagleProposer:
    """Proposes EAGLE-2 trees; its own KV cache holds only accepted context between calls."""

    def __init__(self, drafter: Drafter, target_model: Any, tree: TreeSettings, name: str = "drafter",
                 head_dtype: str = "target") -> None:
        self.name = name
        device = target_model.lm_head.weight.device
        self.drafter = drafter.to(device=device, dtype=target_model.lm_head.weight.dtype)
        self.embed = target_model.get_input_embeddings()
        self.lm_head = vocab_head(target_model.lm_head, head_dtype)
        self.settings = tree
        self.device = device
        self.kv: KV | None = None

    def reset(self) -> None:
        self.kv = None

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def _advance(self, tokens: Tensor, hidden: Tensor, root: int) -> Tensor:
        """Consume the newly committed (feature, next token) pairs into the cache; return the root's predicted
        feature (the drafter's output at the last pair, whose token is the root)."""
        next_tokens = torch.cat([tokens[1:].to(self.device), torch.tensor([root], device=self.device)])
        past = self.kv.length if self.kv is not None else 0
        t = next_tokens.numel()
        positions = torch.arange(past, past + t, device=self.device)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=self.device).tril(past)
        out, new = self.drafter(self.embed(next_tokens), hidden.to(self.device), positions, self.kv, mask)
        self.kv = self.kv.cat(new) if self.kv is not None else new
        return out[-1:]

    @torch.inference_mode()
    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        s = self.settings
        feature = self._advance(tokens, hidden, root)
        assert self.kv is not None
        base = self.kv.length  # drafter position of the depth-1 nodes

        # Candidate nodes, in creation order (parents always before children). Index 0 is the root.
        cand_tokens: list[Tensor] = [torch.tensor([root], device=self.device)]
        cand_parent: list[Tensor] = [torch.tensor([-1], device=self.device)]
        cand_score: list[Tensor] = [torch.zeros(1, device=self.device)]
        cand_entropy: list[Tensor] = [torch.zeros(1, device=self.device)]
        n_cand = 1

        logp = torch.log_softmax(self.lm_head(feature).float(), dim=-1)  # [1, V]
        entropy = -(logp.exp() * logp).sum(-1)  # [1]
        top = torch.topk(logp[0], s.top_k)
        frontier_tokens, frontier_score = top.indices, top.values
        frontier_ids = torch.arange(n_cand, n_cand + s.top_k, device=self.device)
        cand_tokens.append(frontier_tokens)
        cand_parent.append(torch.zeros(s.top_k, dtype=torch.long, device=self.device))
        cand_score.append(frontier_score)
        cand_entropy.append(entropy.expand(s.top_k))
        n_cand += s.top_k
        frontier_features = feature.expand(s.top_k, -1)

        # Tree part of the drafter's cache for this step only: discarded after drafting.
        tree_kv: KV | None = None
        slot_of: dict[int, int] = {}  # candidate index -> slot in tree_kv
        ancestors_of: dict[int, list[int]] = {0: []}  # candidate index -> tree_kv slots of its expanded ancestors
        parent_of: list[int] = [-1] + [0] * s.top_k
        for level in range(s.depth):
            k = frontier_ids.numel()
            ids = frontier_ids.tolist()
            n_tree = tree_kv.length if tree_kv is not None else 0
            mask = torch.zeros(k, base + n_tree + k, dtype=torch.bool, device=self.device)
            mask[:, :base] = True
            for row, c in enumerate(ids):
                anc = ancestors_of[parent_of[c]] + ([slot_of[parent_of[c]]] if parent_of[c] in slot_of else [])
                ancestors_of[c] = anc
                if anc:
                    mask[row, torch.tensor(anc, device=self.device) + base] = True
                mask[row, base + n_tree + row] = True
                slot_of[c] = n_tree + row
            positions = torch.full((k,), base + level, device=self.device)
            past = self.kv.cat(tree_kv) if tree_kv is not None else self.kv
            out, new = self.drafter(self.embed(frontier_tokens), frontier_features, positions, past, mask)
            tree_kv = tree_kv.cat(new) if tree_kv is not None else new

            logp = torch.log_softmax(self.lm_head(out).float(), dim=-1)  # [k, V]
            entropy = -(logp.exp() * logp).sum(-1)  # [k]
            child = torch.topk(logp, s.top_k, dim=-1)  # [k, top_k]
            child_score = (frontier_score[:, None] + child.values).reshape(-1)
            child_tokens = child.indices.reshape(-1)
            child_parent = frontier_ids.repeat_interleave(s.top_k)
            child_ids = torch.arange(n_cand, n_cand + child_score.numel(), device=self.device)
            cand_tokens.append(child_tokens)
            cand_parent.append(child_parent)
            cand_score.append(child_score)
            cand_entropy.append(entropy.repeat_interleave(s.top_k))
            parent_of.extend(child_parent.tolist())
            n_cand += child_score.numel()

            best = torch.topk(child_score, s.top_k).indices
            frontier_ids, frontier_tokens, frontier_score = child_ids[best], child_tokens[best], child_score[best]
            frontier_features = out.repeat_interleave(s.top_k, dim=0)[best]

        return _select(torch.cat(cand_tokens), torch.cat(cand_parent), torch.cat(cand_score),
                       torch.cat(cand_entropy), s.total_tokens)


def _select(tokens: Tensor, parents: Tensor, scores: Tensor, entropy: Tensor, total_tokens: int) -> DraftTree:
    """Keep the root and the best `total_tokens - 1` candidates, parents before children, re-indexed."""
    n = tokens.numel() - 1
    keep_n = min(total_tokens - 1, n)
    # Stable sort on -score: ties keep creation order, so a parent (created first, never scoring below its child)
    # always ranks ahead of its children and the kept set is closed under ancestors.
    order = torch.sort(-scores[1:].cpu(), stable=True).indices[:keep_n] + 1
    kept = torch.sort(order).values  # creation order: parents precede children
    kept = torch.cat([torch.zeros(1, dtype=torch.long), kept])
    new_index = torch.full((n + 1,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(kept.numel())
    par = parents.cpu()[kept]
    new_par = torch.where(par >= 0, new_index[par.clamp(min=0)], torch.full_like(par, -1))
    return DraftTree(tokens=tokens.cpu()[kept], parents=new_par, logp=scores.cpu()[kept], entropy=entropy.cpu()[kept])
