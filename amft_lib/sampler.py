"""A resumable, seeded walk over a list of rows.

Why not a torch DataLoader: the trainer needs its exact position in the data inside every
checkpoint (a resumed run must see the same prompts an uninterrupted run would), and a cursor of
two integers is the simplest thing that is exactly serialisable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Cursor:
    """Epoch-wise shuffled order: epoch e uses random.Random(seed * 1_000_003 + e)."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        """Next k indices, wrapping into a fresh shuffle at each epoch boundary."""
        if self.n == 0:
            raise ValueError("cannot sample from an empty split")
        out: list[int] = []
        order = self._order(self.epoch)
        while len(out) < k:
            if self.position >= self.n:
                self.epoch += 1
                self.position = 0
                order = self._order(self.epoch)
            take = min(k - len(out), self.n - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"data cursor was saved for {state['n']} rows but the split now has {self.n}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
