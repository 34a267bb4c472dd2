"""Drafter training: the EAGLE-2 and HASS objectives over cached target features.

EAGLE-2 (Li et al.): the drafter reads (feature f_s, next token t_{s+1}) and predicts f_{s+1}. Loss per position:
  v_w * SmoothL1(pred, f_{s+1})  (mean over hidden units)  +  p_w * soft cross-entropy(target p, drafter q),
where p = softmax(lm_head(f_{s+1})) and q = softmax(lm_head(pred)); v_w = 1.0, p_w = 0.1; inputs get uniform
noise; AdamW with linear warm-up and decay; gradient values clipped.

HASS (Zhang et al.): the EAGLE losses plus top-k distillation, topk_w * -sum_{v in top-k(p)} p_v log q_v (k = 10),
and harmonized context alignment: `align_steps` forward passes per batch; in pass j the input feature at slot s is
the drafter's own (detached) prediction from pass j-1, and slot s attends exactly to what it would see at draft depth
j: true-feature keys at slots <= s-j+1 and, for each earlier pass k >= 2, the single key at slot s-j+k. The loss of
every pass is summed, as in HASS.

EAGLE-3 (Li et al., 2025): training-time test over three-layer features, token losses only (`training.ttt`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from taps_bench.errors import UserError
from taps_bench.models.drafter import KV, Drafter, has_bf16_matmul, random_drafter, save_drafter, vocab_head
from taps_bench.models.eagle3 import Eagle3Config, Eagle3Drafter, target_ids
from taps_bench.models.eagle3_format import save_safeailab
from taps_bench.training.features import Sequence
from taps_bench.training.ttt import target_distributions, ttt_losses


@dataclass(frozen=True)
class TrainSettings:
    method: Literal["eagle2", "hass", "eagle3"]
    epochs: int = 2
    lr: float = 1e-3
    batch_tokens: int = 2048  # padded tokens per batch
    warmup_frac: float = 0.03
    grad_clip: float = 0.5  # clip gradient values, as EAGLE and HASS do
    betas: tuple[float, float] = (0.9, 0.95)
    noise: float = 0.2  # input features get U(-noise/2, noise/2) noise
    v_w: float = 1.0
    p_w: float = 0.1
    topk_w: float = 1.0  # HASS only
    topk: int = 10  # HASS only
    align_steps: int = 3  # HASS only: forward passes per batch (1 = plain EAGLE training)
    ttt_steps: int = 7  # EAGLE-3 only: unrolled steps of training-time test (EAGLE-3 trains with 7)
    seed: int = 0  # the corpus selection and the batch order
    # The drafter's initial weights; None: `seed`. Separate from `seed` so that two drafters can share (or not) an
    # initialisation while being trained on the same selection of their corpora: weight averaging is known to work
    # only between models that share one, which the study tests directly.
    init_seed: int | None = None
    # The vocabulary projection (target's lm_head) dominates a CPU training step. "auto" runs it in bfloat16 where
    # the hardware has bf16 matrix units (CUDA, or CPUs with AVX512-BF16/AMX: 3.6x faster here), else in float32;
    # softmaxes and losses are always float32. EAGLE and HASS train in bf16 mixed precision too.
    head_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The drafter's own matrix products under bf16 autocast ("auto": where the hardware has bf16 matrix units, as
    # for head_dtype); weights, optimizer state and losses stay float32. tests/test_train.py checks the loss curve
    # against float32 training.
    autocast: Literal["auto", "off", "bfloat16"] = "auto"

    @property
    def initial_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def steps_per_batch(self) -> int:
        return self.align_steps if self.method == "hass" else 1


# -- losses (pure functions; each checked against a direct computation in the tests) --------------------------


def regression_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum_s w_s * mean_h SmoothL1(pred_sh, target_sh) / sum_s w_s."""
    per = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    return (per * weight).sum() / weight.sum().clamp(min=1e-5)


def soft_cross_entropy(logq: Tensor, p: Tensor, weight: Tensor) -> Tensor:
    """sum_s w_s * (-sum_v p_sv log q_sv) / sum_s w_s."""
    return (-(p * logq).sum(-1) * weight).sum() / weight.sum().clamp(min=1e-5)


def topk_distillation(logq: Tensor, p: Tensor, k: int, weight: Tensor) -> Tensor:
    """sum_s w_s * (-sum_{v in top-k(p_s)} p_sv log q_sv) / sum_s w_s."""
    top = torch.topk(p, k, dim=-1).indices
    return (-(p.gather(-1, top) * logq.gather(-1, top)).sum(-1) * weight).sum() / weight.sum().clamp(min=1e-5)


def alignment_mask(length: int, step: int, device: torch.device | str = "cpu") -> Tensor:
    """[length, step * length] bool: what slot s may attend to in alignment pass `step` (1-based).

    Block k = 1 holds the true-feature keys (slots <= s - step + 1); block k >= 2 holds pass k's keys, of which
    only slot s - step + k is visible (the ancestor at that depth; k = step is the slot itself). Pass 1 is causal.
    """
    s = torch.arange(length, device=device)[:, None]
    p = torch.arange(length, device=device)[None, :]
    blocks = [p <= s - step + 1] + [p == s - step + k for k in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


# -- one batch ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    ids: Tensor  # [B, T]
    hidden: Tensor  # [B, T, H] float32
    weight: Tensor  # [B, T-1] float: 1 where slot s's target f_{s+1} sits on an assistant token
    aux: Tensor | None = None  # [B, T, F] float32: EAGLE-3's tapped features, when the sequences carry them


def make_batch(seqs: list[Sequence]) -> Batch:
    t = max(int(s.ids.numel()) for s in seqs)
    b, h = len(seqs), seqs[0].hidden.shape[1]
    ids = torch.zeros(b, t, dtype=torch.long)
    hidden = torch.zeros(b, t, h)
    mask = torch.zeros(b, t)
    first = seqs[0].aux
    aux = torch.zeros(b, t, first.shape[1]) if first is not None else None
    for i, s in enumerate(seqs):
        n = s.ids.numel()
        ids[i, :n], hidden[i, :n], mask[i, :n] = s.ids, s.hidden.float(), s.mask.float()
        if aux is not None:
            assert s.aux is not None
            aux[i, :n] = s.aux.float()
    return Batch(ids=ids, hidden=hidden, weight=mask[:, 1:], aux=aux)


def eagle3_batch_losses(drafter: Eagle3Drafter, embed: nn.Module, lm_head: Callable[[Tensor], Tensor],
                        batch: Batch, s: TrainSettings) -> dict[str, Tensor]:
    if batch.aux is None:
        raise UserError("EAGLE-3 training needs features extracted with the target's three tapped layers")
    d2t = drafter.d2t
    draft_ids = None if d2t is None else target_ids(torch.arange(d2t.numel()), d2t)
    targets = target_distributions(lm_head, batch.hidden[:, 1:], batch.weight, draft_ids)
    return ttt_losses(drafter, embed, batch.ids, batch.aux, targets, s.ttt_steps)


def batch_losses(drafter: Drafter, embed: nn.Module, lm_head: Callable[[Tensor], Tensor], batch: Batch,
                 s: TrainSettings, gen: torch.Generator | None = None) -> dict[str, Tensor]:
    """Losses of one batch, summed over alignment passes (one pass for EAGLE-2); also top-1 agreement."""
    feats = batch.hidden[:, :-1]
    if s.noise and drafter.training:
        feats = feats + (torch.rand(feats.shape, generator=gen) - 0.5) * s.noise
    tokens, target = batch.ids[:, 1:], batch.hidden[:, 1:]
    length = tokens.shape[1]
    positions = torch.arange(length)[None].expand(tokens.shape[0], -1)
    emb = embed(tokens).detach()
    # The vocabulary-sized terms are computed only where the loss weight is non-zero (assistant tokens): the
    # target's 49152 x 576 lm_head is most of a CPU step, and prompt positions would contribute zero anyway.
    sel = batch.weight > 0
    w = batch.weight[sel]
    with torch.no_grad():
        p = torch.softmax(lm_head(target[sel]).float(), dim=-1)
    out: dict[str, Tensor] = {"loss": torch.zeros(()), "v": torch.zeros(()), "p": torch.zeros(()),
                              "topk": torch.zeros(()), "acc": torch.zeros(())}
    past: KV | None = None
    inputs = feats
    for step in range(1, s.steps_per_batch + 1):
        mask = alignment_mask(length, step)[None, None]
        pred, new = drafter(emb, inputs, positions, past, mask)
        logq = torch.log_softmax(lm_head(pred[sel]).float(), dim=-1)
        v = regression_loss(pred, target, batch.weight)
        ce = soft_cross_entropy(logq, p, w)
        loss = s.v_w * v + s.p_w * ce
        if s.method == "hass":
            tk = topk_distillation(logq, p, s.topk, w)
            loss = loss + s.topk_w * tk
            out["topk"] = out["topk"] + tk.detach()
        out["loss"] = out["loss"] + loss
        out["v"] = out["v"] + v.detach()
        out["p"] = out["p"] + ce.detach()
        if step == 1:
            out["acc"] = ((logq.argmax(-1) == p.argmax(-1)).float() * w).sum() / w.sum().clamp(min=1)
        past = past.cat(new) if past is not None else new
        # The next pass reads the drafter's own predictions, shifted one slot (slot 0 keeps its true feature).
        inputs = torch.cat([feats[:, :1], pred[:, :-1].detach()], dim=1)
    return out


# -- the loop ---------------------------------------------------------------------------------------------------


def batches(seqs: list[Sequence], batch_tokens: int, gen: torch.Generator) -> list[list[int]]:
    """Length-bucketed batches (little padding), in a seeded random order."""
    order = sorted(range(len(seqs)), key=lambda i: int(seqs[i].ids.numel()))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        n = int(seqs[i].ids.numel())
        if cur and n * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    perm = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in perm]


def train(drafter: Drafter | Eagle3Drafter | None, target_model: Any, seqs: list[Sequence], s: TrainSettings,
          work_dir: Path, show_progress: bool = True, log: Any = None) -> tuple[Any, dict[str, Any]]:
    """Train (or resume training) a drafter; per-epoch checkpoints in `work_dir/state.pt`. Deterministic per seed.
    An EAGLE-3 drafter must be given (`fresh_eagle3`: its draft vocabulary is chosen before training)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    if drafter is None and s.method == "eagle3":
        raise ValueError("EAGLE-3 training starts from a given drafter (fresh_eagle3)")
    drafter = drafter if drafter is not None else _fresh(target_model.config, s.initial_seed)
    # What the saved state belongs to: a resume with other settings or data would silently continue the wrong run.
    identity = json.dumps({"settings": asdict(s), "sequences": len(seqs),
                           "tokens": sum(int(q.ids.numel()) for q in seqs)}, sort_keys=True)
    drafter.train()
    # The target is frozen: without this autograd also computes the gradient of its 49152 x 576 lm_head (tied to
    # the embeddings) in every pass, a third of a HASS step's matrix work, and accumulates it into the target.
    target_model.requires_grad_(False)
    embed, lm_head = target_model.get_input_embeddings(), vocab_head(target_model.lm_head, s.head_dtype)
    params = [p for p in drafter.parameters() if p.requires_grad]
    device_type = next(drafter.parameters()).device.type
    use_autocast = s.autocast == "bfloat16" or (s.autocast == "auto" and has_bf16_matmul())
    opt = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=0.0)
    per_epoch = len(batches(seqs, s.batch_tokens, torch.Generator().manual_seed(0)))
    total = max(1, per_epoch * s.epochs)
    warm = max(1, int(total * s.warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))))
    history: list[dict[str, float]] = []
    start_epoch, tokens_seen, seconds = 0, 0, 0.0
    state_path = work_dir / "state.pt"
    if state_path.is_file():  # resume at the last finished epoch
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("identity") != identity:
            raise UserError(f"{state_path} holds a training run with other settings or data; remove it (or the "
                            "drafter's directory) to start afresh, or train under another name")
        drafter.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, tokens_seen, seconds = int(state["epoch"]), int(state["tokens_seen"]), float(state["seconds"])
        history = json.loads(state["history"])
    bar = tqdm(total=total, initial=start_epoch * per_epoch, unit="batch", desc=f"train {s.method}",
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    for epoch in range(start_epoch, s.epochs):
        gen = torch.Generator().manual_seed(s.seed * 1000 + epoch)
        sums: dict[str, float] = {}
        n_batches = 0
        for idx in batches(seqs, s.batch_tokens, gen):
            t0 = time.perf_counter()
            batch = make_batch([seqs[i] for i in idx])
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_autocast):
                if isinstance(drafter, Eagle3Drafter):
                    losses = eagle3_batch_losses(drafter, embed, lm_head, batch, s)
                else:
                    losses = batch_losses(drafter, embed, lm_head, batch, s, gen)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_value_(params, s.grad_clip)
            opt.step()
            sched.step()
            seconds += time.perf_counter() - t0
            tokens_seen += int(batch.weight.sum())
            n_batches += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix_str(f"loss {float(losses['loss'].detach()):.3f} acc {float(losses['acc']):.2f} "
                                f"{tokens_seen / max(seconds, 1e-9):.0f} tok/s")
        record = {"epoch": epoch + 1, **{k: v / max(1, n_batches) for k, v in sums.items()},
                  "lr": sched.get_last_lr()[0], "tokens_seen": tokens_seen, "seconds": seconds}
        history.append(record)
        if log is not None:
            log(record)
        tmp = state_path.with_suffix(".part")
        torch.save({"drafter": drafter.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch + 1, "tokens_seen": tokens_seen, "seconds": seconds, "identity": identity,
                    "history": json.dumps(history)}, tmp)
        tmp.replace(state_path)
    bar.close()
    drafter.eval()
    final = history[-1] if history else {}
    return drafter, {"settings": asdict(s), "history": history, "tokens_seen": tokens_seen,
                     "train_seconds": seconds, "steps": total, "final": final}


def _fresh(target_config: Any, seed: int) -> Drafter:
    """A new drafter: PyTorch's default Linear init, norms at one (EAGLE starts its layer the same way)."""
    torch.manual_seed(seed)
    d = random_drafter(target_config, seed=seed)
    for module in d.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return d


def fresh_eagle3(target_model: Any, draft_ids: Tensor | None, seed: int) -> Eagle3Drafter:
    """A new EAGLE-3 drafter of the target's width and layer shape over the draft vocabulary `draft_ids` (sorted
    target ids; None: the full vocabulary), reading the default three layers. PyTorch's default Linear init and
    norms at one, as `_fresh`; the head starts from the target's lm_head rows of the draft vocabulary and the final
    norm from the target's (the drafter's output is its own representation, so both are trained, but on a
    CPU-sized budget a head that starts where the target's words are learns faster than one from noise)."""
    c = target_model.config
    vocab = int(c.vocab_size)
    n = vocab if draft_ids is None else int(draft_ids.numel())
    config = Eagle3Config(hidden_size=int(c.hidden_size), intermediate_size=int(c.intermediate_size),
                          heads=int(c.num_attention_heads), kv_heads=int(c.num_key_value_heads),
                          head_dim=int(c.hidden_size) // int(c.num_attention_heads), vocab_size=vocab,
                          draft_vocab_size=n, target_hidden_size=int(c.hidden_size),
                          rms_norm_eps=float(c.rms_norm_eps), rope_theta=_rope_theta(c))
    torch.manual_seed(seed)
    d = Eagle3Drafter(config)
    with torch.no_grad():
        head = target_model.lm_head.weight.detach().float()
        d.lm_head.weight.copy_(head if draft_ids is None else head[draft_ids])
        d.norm.weight.copy_(target_model.model.norm.weight.detach().float())
        if draft_ids is not None:
            assert d.d2t is not None and d.t2d is not None
            d.d2t.copy_(draft_ids - torch.arange(n))
            d.t2d.zero_()
            d.t2d[draft_ids] = True
    return d


def _rope_theta(config: Any) -> float:
    """The target's rotary base (transformers 5 keeps it in `rope_parameters`): a drafter trained here uses its
    target's positions, and says so in its own config."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def save_trained(drafter: Drafter | Eagle3Drafter, out_dir: Path, card: dict[str, Any]) -> Path:
    """The checkpoint (EAGLE format; SafeAILab's EAGLE-3 layout for EAGLE-3) plus the drafter card, written so that
    a half-written drafter never looks built."""
    import yaml

    if isinstance(drafter, Eagle3Drafter):
        save_safeailab(drafter, out_dir)
    else:
        save_drafter(drafter, out_dir)
    (out_dir / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return out_dir
