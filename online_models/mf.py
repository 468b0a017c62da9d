"""Implicit-feedback matrix factorisation on River's ``reco.FunkMF``, with sampled negatives.

Every click is a positive with target ``click_weight``, a purchase one with target
``purchase_weight``; each positive is followed by ``n_negatives`` negatives (target 0)
drawn from a ring buffer of recently interacted items, i.e. in proportion to recent
popularity (popular items are the informative negatives). River's FunkMF does the SGD.

River keeps item factors in a dict of arrays; this learner mirrors each updated row into
a numpy matrix so that scoring ~200 candidates, or proposing from a pool of the
``pool_size`` most interacted items, is one matrix-vector product.

At most ``max_items`` items are kept (when a new one would pass that, the three quarters
with the most interactions stay). The user vector is the learned one for a user FunkMF has
seen (at most ``max_users`` are kept, the least recently active forgotten); otherwise (a new user, or a
session used as a user) the mean of the factors of the user's recent items. A user with
neither scores 0 for every item. Unseen items score 0. Predicting never creates state
(River's defaultdicts would).

>>> from online_models.types import Interaction, UserContext
>>> mf = ImplicitMF(seed=1)
>>> for t in range(30):
...     mf.learn_one(Interaction(f"u{t % 3}", f"i{t % 5}", ts=t))
>>> isinstance(mf.predict_one(UserContext("u1"), "i2"), float), mf.predict_one(UserContext("new"), "nope")
(True, 0.0)
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Sequence

import numpy as np

from online_models.base import OnlineLearner, heaviest_rows, trim_oldest
from online_models.types import Interaction, UserContext


class ImplicitMF(OnlineLearner):
    name = "mf"

    def __init__(
        self,
        n_factors: int = 16,
        learning_rate: float = 0.05,
        l2: float = 0.001,
        init_std: float = 0.1,
        n_negatives: int = 3,
        click_weight: float = 1.0,
        purchase_weight: float = 2.0,
        negative_buffer: int = 5000,
        pool_size: int = 500,
        refresh_every: int = 500,
        n_recent: int = 5,
        max_users: int = 200_000,
        max_items: int = 300_000,
        seed: int = 0,
    ):
        self.n_factors = n_factors
        self.learning_rate = learning_rate
        self.l2 = l2
        self.init_std = init_std
        self.n_negatives = n_negatives
        self.click_weight = click_weight
        self.purchase_weight = purchase_weight
        self.negative_buffer = negative_buffer
        self.pool_size = pool_size
        self.refresh_every = refresh_every
        self.n_recent = n_recent
        self.max_users = max_users
        self.max_items = max_items
        self.seed = seed
        self.n_learned = 0
        # River here, where the model is made: importing it (and scipy.special, which it loads)
        # took about a quarter of a second of every command's start, `streamrec --help`,
        # `produce` and `tail` among them, that never make one
        from river import optim, reco

        self.model = reco.FunkMF(
            n_factors=n_factors,
            optimizer=optim.SGD(learning_rate),
            loss=optim.losses.Squared(),
            l2=l2,
            initializer=optim.initializers.Normal(mu=0.0, sigma=init_std, seed=seed),
            seed=seed,
        )
        self._rng = random.Random(seed)
        self._index: dict[str, int] = {}
        self._items: list[str] = []
        self._factors = np.zeros((64, n_factors))
        self._counts = np.zeros(64)
        self._recent: list[int] = []  # ring buffer of item rows, for negatives
        self._recent_pos = 0
        self._pool = np.zeros(0, dtype=np.int64)

    # -- learning ---------------------------------------------------------------------
    def _row(self, item_id: str) -> int:
        idx = self._index.get(item_id)
        if idx is None:
            if len(self._items) >= self.max_items:
                self._evict()
            idx = len(self._items)
            self._index[item_id] = idx
            self._items.append(item_id)
            if idx >= len(self._factors):
                self._factors = np.concatenate([self._factors, np.zeros_like(self._factors)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        return idx

    def _evict(self) -> None:
        """Keep the three quarters of ``max_items`` items with the most interactions (their
        factors, counts and place in the negatives' buffer); forget the rest."""
        counts = self._counts[: len(self._items)]
        keep, new_row = heaviest_rows(counts, self.max_items)
        kept = set(keep.tolist())
        latents = self.model.i_latents
        for r, item in enumerate(self._items):
            if r not in kept:
                latents.pop(item, None)
        self._items = [self._items[i] for i in keep.tolist()]
        self._index = {item: r for r, item in enumerate(self._items)}
        capacity = len(self._counts)  # it held max_items rows: room enough
        factors, fresh_counts = np.zeros((capacity, self.n_factors)), np.zeros(capacity)
        factors[: len(keep)] = self._factors[keep]
        fresh_counts[: len(keep)] = counts[keep]
        self._factors, self._counts = factors, fresh_counts
        rows = new_row.tolist()
        self._recent = [rows[r] for r in self._recent if rows[r] >= 0]
        self._recent_pos = 0 if len(self._recent) < self.negative_buffer else self._recent_pos % len(self._recent)
        self._refresh_pool()

    def _fit(self, user_id: str, item_id: str, idx: int, y: float) -> None:
        self.model.learn_one(user_id, item_id, y)
        self._factors[idx] = self.model.i_latents[item_id]

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        self.n_learned += 1
        idx = self._row(x.item_id)
        self._counts[idx] += 1.0
        users = self.model.u_latents
        latent = users.pop(x.user_id, None)
        if latent is not None:
            users[x.user_id] = latent  # most recently active last
        else:
            trim_oldest(users, self.max_users - 1)  # forget the least recently active users
        y = self.purchase_weight if x.kind == "purchase" else self.click_weight
        self._fit(x.user_id, x.item_id, idx, y)
        recent = self._recent
        if recent:
            items, rand = self._items, self._rng.random
            for _ in range(self.n_negatives):
                neg = recent[int(rand() * len(recent))]
                if neg != idx:
                    self._fit(x.user_id, items[neg], neg, 0.0)
        if len(recent) < self.negative_buffer:
            recent.append(idx)
        else:
            recent[self._recent_pos] = idx
            self._recent_pos = (self._recent_pos + 1) % self.negative_buffer
        if self.n_learned % self.refresh_every == 0 or len(self._pool) < min(self.pool_size, len(self._items)) // 2:
            self._refresh_pool()

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """The user's factor vector goes (FunkMF's only per-user state; it is keyed by user id
        and sessions play no part here). Item factors, counts, the negatives' buffer (item rows)
        and the pool stay: the user's events moved them, but they hold no user."""
        self.model.u_latents.pop(user_id, None)

    def _refresh_pool(self) -> None:
        n = len(self._items)
        if n > self.pool_size:
            pool = np.argpartition(-self._counts[:n], self.pool_size - 1)[: self.pool_size]
            pool.sort()
        else:
            pool = np.arange(n)
        self._pool = pool

    # -- snapshots --------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """River keeps one small array per user and item (~150 bytes of pickle overhead
        each); a snapshot stores them as two matrices instead (5x smaller, 20x faster)."""
        state = self.__dict__.copy()
        model = self.model.__dict__.copy()
        users = self.model.u_latents
        ids = list(users)
        matrix = np.array([users[u] for u in ids]).reshape(len(ids), self.n_factors)
        model["u_latents"] = (users.default_factory, ids, matrix)
        model["i_latents"] = (self.model.i_latents.default_factory, None, None)  # = _factors rows
        state["model"] = (type(self.model), model)
        state["_factors"] = self._factors[: len(self._items)].copy()
        return state

    def __setstate__(self, state: dict) -> None:
        cls, model_state = state["model"]
        ufactory, ids, matrix = model_state["u_latents"]
        ifactory = model_state["i_latents"][0]
        items, factors = state["_items"], state["_factors"]
        model = cls.__new__(cls)
        model.__dict__.update(model_state)
        model.u_latents = collections.defaultdict(ufactory, zip(ids, (row.copy() for row in matrix), strict=False))
        model.i_latents = collections.defaultdict(ifactory, zip(items, (row.copy() for row in factors), strict=False))
        full = np.zeros((len(state["_counts"]), factors.shape[1]))  # same capacity as _counts
        full[: len(factors)] = factors
        self.__dict__.update({**state, "model": model, "_factors": full})

    # -- scoring ----------------------------------------------------------------------
    def user_vector(self, user: UserContext) -> np.ndarray | None:
        """The vector a user's scores are dot products with (None: nothing known)."""
        known = self.model.u_latents.get(user.user_id)  # .get: no defaultdict insert
        if known is not None:
            return known
        rows = [self._index[i] for i in user.recent_items[-self.n_recent :] if i in self._index]
        if not rows:
            return None
        return self._factors[rows].mean(axis=0)

    def predict_one(self, user: UserContext, item_id: str) -> float:
        idx = self._index.get(item_id)
        u = self.user_vector(user)
        if idx is None or u is None:
            return 0.0
        return float(self._factors[idx] @ u)

    def score_many(self, user: UserContext, items: Sequence[str]) -> list[float]:
        u = self.user_vector(user)
        if u is None:
            return [0.0] * len(items)
        get = self._index.get
        rows = np.array([get(i, -1) for i in items], dtype=np.int64)
        known = rows >= 0
        scores = self._factors[np.where(known, rows, 0)] @ u
        return np.where(known, scores, 0.0).tolist()

    def propose_scores(self, user: UserContext, k: int) -> list[tuple[str, float]]:
        u = self.user_vector(user)
        pool = self._pool
        if u is None or not len(pool):
            return []
        scores = self._factors[pool] @ u
        if len(pool) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            pool, scores = pool[part], scores[part]
        order = np.lexsort((pool, -scores))
        items = self._items
        return list(zip([items[r] for r in pool[order].tolist()], scores[order].tolist(), strict=False))


__all__ = ["ImplicitMF"]
