"""Train :class:`~gpu_scorer.model.SASRecScorer` on per-user, time-ordered item sequences.

- Split: for up to ``eval_users`` users with at least 3 items (a seeded sample) the last
  item is held out for validation (its input is everything before it); training never sees
  that item as a target. Every other user trains on the whole sequence.
- Samples: each training sequence is cut into windows of ``max_len + 1`` items (the last
  window first, overlapping by one item), so every transition is a target once per epoch;
  each position predicts the next item.
- Loss: full softmax cross-entropy over the item table (``loss="ce"``, best quality,
  fine up to ~10^5 items), or a sampled softmax against ``n_negatives`` uniformly drawn
  items shared by the batch (``loss="sampled"``, for big catalogues).
- Validation: HR@10 and NDCG@10 of the held-out item ranked among all items; early
  stopping on NDCG@10 with ``patience``; the best epoch's weights are kept.
- Determinism: ``seed`` fixes initialisation, shuffling and dropout; on CPU the same seed
  and data give bit-identical weights (same thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn import functional as F

from gpu_scorer.model import SASRecScorer, ScorerConfig
from gpu_scorer.vocab import FIRST_ITEM_ROW, OOV_ROW, PAD_ROW, Vocab
from online_models.datasets import sequences_by_user
from online_models.metrics import rank_summary


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # "ce" | "sampled"
    n_negatives: int = 256
    patience: int = 3
    min_item_count: int = 1
    seed: int = 0
    eval_users: int = 2000  # users holding out their last item for validation
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when torch sees one)
    progress: bool = True


@dataclass
class TrainResult:
    model: SASRecScorer
    vocab: Vocab
    config: ScorerConfig
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    #: the held-out ``(input items, held-out item)`` pairs the validation metrics are of
    validation: list[tuple[list[str], str]] = field(default_factory=list)


#: the interaction kinds a model is trained on
TRAINED_KINDS = ("click", "purchase")


def sequences_from_interactions(interactions: Iterable, kinds: Sequence[str] = TRAINED_KINDS) -> dict[str, list[str]]:
    """User -> item ids in time order (``online_models.types.Interaction`` values)."""
    return {u: [x.item_id for x in xs if x.kind in kinds] for u, xs in sequences_by_user(interactions).items()}


def trained_through(interactions: Iterable, kinds: Sequence[str] = TRAINED_KINDS, *,
                    not_after: int | None = None) -> int | None:
    """The newest ``ts`` (unix ms, as every log format and event has it) of ``interactions`` of
    the ``kinds`` a model is trained on, leaving out those dated after ``not_after`` (the fit's
    clock: a producer's clock ahead of it, or a log dated in the future); ``not_after`` itself
    where every one is; None without any. A version records it as its manifest's
    ``data.trained_through``: ``streamrec retrain``'s gate compares on the events newer than the
    ``CURRENT`` version's (gpu_scorer/retraining.py), so one event dated a day ahead must not
    make every event of the next day look older than what the model knows.

    >>> from online_models.types import Interaction
    >>> log = [Interaction("u", "i", 5), Interaction("v", "j", 9)]
    >>> trained_through(log), trained_through(log, not_after=7), trained_through(log, not_after=3), trained_through([])
    (9, 5, 3, None)
    """
    times = [x.ts for x in interactions if x.kind in kinds]
    if not_after is None or not times:
        return max(times, default=None)
    return max((ts for ts in times if ts <= not_after), default=not_after)


def split_last(
    sequences: Mapping[str, Sequence[str]], max_valid: int | None = None, seed: int = 0
) -> tuple[list[list[str]], list[tuple[list[str], str]]]:
    """(training sequences, [(validation input, held-out item)]), users in sorted order.

    Users with 3+ items are eligible for validation; at most ``max_valid`` of them
    (a seeded sample) give up their last item, the others train on everything.
    """
    users = sorted(sequences)
    held = set(sample_users([u for u in users if len(sequences[u]) >= 3], max_valid, seed))
    train, valid = [], []
    for user in users:
        seq = list(sequences[user])
        if user in held:
            valid.append((seq[:-1], seq[-1]))
            seq = seq[:-1]
        if len(seq) >= 2:
            train.append(seq)
    return train, valid


def sample_users(users: Sequence[str], at_most: int | None, seed: int = 0) -> list[str]:
    """At most ``at_most`` of ``users`` (None: all), a seeded sample, in their order."""
    if at_most is None or len(users) <= at_most:
        return list(users)
    rng = np.random.default_rng(seed)
    return [users[i] for i in sorted(rng.choice(len(users), at_most, replace=False))]


def windows(rows: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (inputs, targets) windows of ``max_len`` steps; target 0 = ignore."""
    inputs, targets = [], []
    for seq in rows:
        end = len(seq)
        while end >= 2:
            chunk = seq[max(0, end - max_len - 1) : end]
            x, y = np.zeros(max_len, np.int64), np.zeros(max_len, np.int64)
            x[max_len - len(chunk) + 1 :] = chunk[:-1]
            y[max_len - len(chunk) + 1 :] = chunk[1:]
            inputs.append(x)
            targets.append(y)
            end -= max_len
    return np.stack(inputs), np.stack(targets)


def left_pad(rows: list[list[int]], max_len: int) -> np.ndarray:
    out = np.zeros((len(rows), max_len), np.int64)
    for i, r in enumerate(rows):
        r = r[-max_len:] or [OOV_ROW]
        out[i, max_len - len(r) :] = r
    return out


def validation_rows(valid: Sequence[tuple[Sequence[str], str]], vocab: Vocab, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out ``(input, item)`` pairs as a model with ``vocab`` reads them: left-padded input
    rows and target rows (an item ``vocab`` lacks is the OOV row: a miss in :func:`rank_metrics`)."""
    inputs = left_pad([vocab.rows(s) for s, _ in valid], max_len)
    return inputs, np.array([vocab.row(t) for _, t in valid], np.int64)


def _ranks(scores: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """1-based rank of each target among the real items of ``scores`` [B, rows of the item
    table], 0 for a miss (an OOV target, or a row with a NaN)."""
    scores[:, :FIRST_ITEM_ROW] = -torch.inf
    rank = (scores > scores.gather(1, targets[:, None])).sum(1) + 1
    # a NaN score compares false with everything, so a diverged model ranked every target
    # first, and early stopping kept its epoch: a row with a NaN is a miss
    hit = (targets >= FIRST_ITEM_ROW) & ~torch.isnan(scores).any(1)
    return torch.where(hit, rank, 0).tolist()


def _summary(ranks: list[int], k: int) -> dict[str, float]:
    m = rank_summary(ranks, ks=(k,))
    return {f"hr@{k}": m[f"HR@{k}"], f"ndcg@{k}": m[f"NDCG@{k}"]}


def model_ranks(model: SASRecScorer, inputs: np.ndarray, targets: np.ndarray, batch: int = 512) -> list[int]:
    """1-based rank of each of ``targets`` among all real items (PAD and OOV excluded) after
    its row of ``inputs``; 0 for a miss (an OOV target)."""
    model.eval()
    ranks: list[int] = []
    dev = model.item_emb.weight.device
    with torch.inference_mode():
        table = model.item_emb.weight
        for lo in range(0, len(inputs), batch):
            h = model.encode_last(torch.from_numpy(inputs[lo : lo + batch]).to(dev))
            ranks.extend(_ranks(h @ table.T, torch.from_numpy(targets[lo : lo + batch]).to(dev)))
    return ranks


def rank_metrics(model: SASRecScorer, inputs: np.ndarray, targets: np.ndarray, k: int = 10, batch: int = 512) -> dict[str, float]:
    """HR@k and NDCG@k of ``targets`` ranked among all real items (PAD and OOV excluded)."""
    return _summary(model_ranks(model, inputs, targets, batch), k)


def scorer_ranks(scorer, valid: Sequence[tuple[Sequence[str], str]], cells: int = 1 << 18) -> list[int]:
    """:func:`model_ranks` of an exported model (an :class:`~gpu_scorer.runtime.OnnxScorer`:
    ``vocab``, ``max_len``, ``run_ids``) on held-out ``(input, item)`` pairs of item ids, read
    through its own vocabulary: an item it lacks is a miss (0). Every row of its item table is
    a candidate, ``cells`` users x rows per call at most."""
    inputs, targets = validation_rows(valid, scorer.vocab, scorer.max_len)
    n_rows = len(scorer.vocab)
    batch = max(1, cells // n_rows)
    ranks: list[int] = []
    for lo in range(0, len(inputs), batch):
        seq = inputs[lo : lo + batch]
        cand = np.broadcast_to(np.arange(n_rows, dtype=np.int64), (len(seq), n_rows)).copy()
        scores = torch.from_numpy(np.array(scorer.run_ids(seq, cand), dtype=np.float32))  # a copy: ranking writes to it
        ranks.extend(_ranks(scores, torch.from_numpy(targets[lo : lo + batch])))
    return ranks


def scorer_rank_metrics(scorer, valid: Sequence[tuple[Sequence[str], str]], k: int = 10,
                        cells: int = 1 << 18) -> dict[str, float]:
    """:func:`rank_metrics` of an exported model (:func:`scorer_ranks`)."""
    return _summary(scorer_ranks(scorer, valid, cells), k)


def _loss(model: SASRecScorer, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    h = model.encode_all(x)  # [B, L, D]
    mask = y != PAD_ROW
    h, y = h[mask], y[mask]
    table = model.item_emb.weight
    if tc.loss == "ce":
        logits = h @ table.T
        logits[:, PAD_ROW] = -torch.inf
        return F.cross_entropy(logits, y)
    if tc.loss != "sampled":
        raise ValueError(f"loss must be 'ce' or 'sampled', saw {tc.loss!r}")
    neg = torch.randint(OOV_ROW, table.shape[0], (tc.n_negatives,), generator=gen).to(h.device)
    pos_logit = (h * table[y]).sum(-1, keepdim=True)
    neg_logit = h @ table[neg].T
    neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], -torch.inf)  # accidental hits
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def train(
    sequences: Mapping[str, Sequence[str]],
    model_config: dict | None = None,
    train_config: TrainConfig | None = None,
    console=None,
) -> TrainResult:
    """Train on user -> time-ordered item ids; ``model_config`` overrides ScorerConfig fields."""
    tc = train_config or TrainConfig()
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    train_seqs, valid = split_last(sequences, tc.eval_users, tc.seed)
    if not train_seqs:
        raise ValueError("no user has two or more interactions: nothing to train on")
    vocab = Vocab.build((it for s in train_seqs for it in s), min_count=tc.min_item_count)
    cfg = ScorerConfig(n_items=len(vocab), **(model_config or {}))
    dev = training_device(tc.device)
    model = SASRecScorer(cfg).to(dev)
    x_all, y_all = windows([vocab.rows(s) for s in train_seqs], cfg.max_len)
    vx, vy = validation_rows(valid, vocab, cfg.max_len)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    n_batches = math.ceil(len(x_all) / tc.batch_size)
    history: list[dict[str, float]] = []
    best, best_state, bad = -1.0, None, 0
    started = time.perf_counter()
    with _progress(console, tc.progress) as progress:
        task = progress.add_task("training", total=tc.epochs * n_batches, status="")
        for epoch in range(1, tc.epochs + 1):
            model.train()
            perm = torch.randperm(len(x_all), generator=gen).numpy()
            total = 0.0
            for b in range(n_batches):
                idx = perm[b * tc.batch_size : (b + 1) * tc.batch_size]
                xb, yb = torch.from_numpy(x_all[idx]).to(dev), torch.from_numpy(y_all[idx]).to(dev)
                loss = _loss(model, xb, yb, tc, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                progress.update(task, advance=1, status=f"epoch {epoch} loss {total / (b + 1):.3f}")
            metrics = rank_metrics(model, vx, vy) if len(vx) else {"hr@10": 0.0, "ndcg@10": 0.0}
            history.append({"epoch": epoch, "loss": total / n_batches, **metrics})
            said = f"epoch {epoch} loss {total / n_batches:.3f} val HR@10 {metrics['hr@10']:.3f} NDCG@10 {metrics['ndcg@10']:.3f}"
            progress.update(task, status=said)
            if tc.progress and console is not None and not console.is_terminal:  # a job's log: rich draws its bar only
                console.print(f"{said} ({epoch}/{tc.epochs} epochs, {time.perf_counter() - started:.0f} s)")  # at the end
            if metrics["ndcg@10"] > best:
                best, bad = metrics["ndcg@10"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= tc.patience:
                    progress.update(task, total=epoch * n_batches, completed=epoch * n_batches)
                    break
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    if not (x_all == OOV_ROW).any():
        set_oov_to_rare_mean(model, vocab)
    best_epoch = max(history, key=lambda h: h["ndcg@10"])
    metrics = {
        "val_hr@10": best_epoch["hr@10"],
        "val_ndcg@10": best_epoch["ndcg@10"],
        "best_epoch": best_epoch["epoch"],
        "epochs_run": len(history),
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    data = {
        "users": len(sequences),
        "train_sequences": len(train_seqs),
        "train_windows": int(len(x_all)),
        "train_targets": int((y_all != 0).sum()),
        "validation_users": len(valid),
        "items": len(vocab) - FIRST_ITEM_ROW,
    }
    return TrainResult(model, vocab, cfg, metrics, history, data, valid)


def set_oov_to_rare_mean(model: SASRecScorer, vocab: Vocab, share: float = 0.2) -> None:
    """When no training item fell under ``min_item_count`` the OOV row was never trained;
    give it the mean embedding of the rarest ``share`` of the vocabulary (rows are sorted
    by frequency), so an unknown item scores like a typical rare item, not at random."""
    n = len(vocab) - FIRST_ITEM_ROW
    if n == 0:
        return
    lo = FIRST_ITEM_ROW + int(n * (1 - share))
    with torch.no_grad():
        model.item_emb.weight[OOV_ROW] = model.item_emb.weight[min(lo, len(vocab) - 1) :].mean(0)


def training_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("training device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def _progress(console, enabled: bool):
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


__all__ = ["TRAINED_KINDS", "TrainConfig", "TrainResult", "model_ranks", "rank_metrics", "sample_users",
           "scorer_rank_metrics", "scorer_ranks", "sequences_from_interactions", "split_last", "train",
           "trained_through", "validation_rows", "windows"]
