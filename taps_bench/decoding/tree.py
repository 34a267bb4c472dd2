"""Draft trees as plain tensors: what every proposer returns and the engine verifies.

Node 0 is the root: the last token the target produced, not yet in its KV cache. Every other node is a drafted
token whose parent precedes it (parents[i] < i), so one left-to-right pass sees parents before children.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class DraftTree:
    tokens: Tensor  # [N] long; tokens[0] is the root
    parents: Tensor  # [N] long; parents[0] == -1, parents[i] < i
    logp: Tensor  # [N] float: cumulative draft log-probability of the path to the node (root: 0)
    entropy: Tensor  # [N] float: entropy of the draft distribution the node was chosen from (root: 0)
    source: Tensor | None = None  # [N] long: which drafter proposed the node (combiners); None: a single drafter
    depths: Tensor = field(init=False)  # [N] long: root 0, its children 1, ...

    def __post_init__(self) -> None:
        parents = self.parents.tolist()
        depths = [0] * len(parents)
        for i in range(1, len(parents)):
            if not 0 <= parents[i] < i:
                raise ValueError(f"draft tree node {i} has parent {parents[i]}: parents must precede children")
            depths[i] = depths[parents[i]] + 1
        object.__setattr__(self, "depths", torch.tensor(depths, dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())


def root_only(token: int, device: torch.device | str = "cpu") -> DraftTree:
    """The tree of plain autoregressive decoding: the root and nothing drafted."""
    zero = torch.zeros(1, device=device)
    return DraftTree(tokens=torch.tensor([token], device=device), parents=torch.tensor([-1]), logp=zero,
                     entropy=zero.clone())


def prefix(tree: DraftTree, n: int) -> DraftTree:
    """The first n nodes: still a tree, since parents precede children."""
    return DraftTree(tokens=tree.tokens[:n], parents=tree.parents[:n], logp=tree.logp[:n],
                     entropy=tree.entropy[:n], source=None if tree.source is None else tree.source[:n])


def ancestor_mask(parents: Tensor) -> Tensor:
    """[N, N] bool: mask[i, j] is True when j is i itself or one of its ancestors (what node i may attend to).
    One vectorised pass per tree level, not per node."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    rows = torch.arange(n)
    up = parents.cpu().clone()
    while bool((up >= 0).any()):
        live = up >= 0
        mask[rows[live], up[live]] = True
        up = torch.where(live, parents.cpu()[up.clamp(min=0)], up)
    return mask


def children_of(tree: DraftTree) -> list[list[int]]:
    """Children of every node, best draft log-probability first (the order the sampling rule visits them)."""
    kids: list[list[int]] = [[] for _ in range(tree.size)]
    for i, p in enumerate(tree.parents.tolist()[1:], start=1):
        kids[p].append(i)
    logp = tree.logp.tolist()
    for k in kids:
        k.sort(key=lambda i: (-logp[i], i))
    return kids


def path_to(tree: DraftTree, node: int) -> list[int]:
    par = tree.parents.tolist()
    path = [node]
    while par[path[-1]] >= 0:
        path.append(par[path[-1]])
    return path[::-1]
