"""A continuous decode batch, advanced in closed form between events.

Every round gives each running request one token, and its time is linear in the round number while
the batch is unchanged: with n requests, S context tokens and k = min(pp, n) pipeline micro-batches,

    round j takes  alpha + beta * j,   alpha = A + (B*S + C*n) / k,   beta = B*n / k

(pp stages each run 1/pp of every micro-batch, so a round is one pass of all micro-batches through
the pipeline). The simulator therefore jumps from event to event (a request joins, finishes, or
memory runs out) instead of stepping token by token, which keeps a simulation O(requests).
"""

from __future__ import annotations

import heapq
import math

from services.planner.latency import StepProfile


class DecodeBatch:
    def __init__(self, step: StepProfile, pp: int) -> None:
        self.step, self.pp = step, pp
        self.n = 0
        self.sum_ctx = 0
        self.rounds = 0  # rounds completed since the start
        self._due: list[tuple[int, int]] = []  # (round at which it finishes, request), lazily pruned
        self._members: dict[int, tuple[int, int]] = {}  # request -> (finish round, round it joined)
        self._ctx0: dict[int, int] = {}  # request -> context when it joined
        self._order: list[int] = []  # join order (lazily pruned): the newest is preempted first

    def __contains__(self, request: int) -> bool:
        return request in self._members

    def coeffs(self) -> tuple[float, float]:
        """(alpha, beta) in seconds for the current batch."""
        n = self.n
        k = min(self.pp, n)
        return self.step.decode_round(n, self.sum_ctx, self.pp), self.step.decode_coeffs(n / k).b * n / k / 1000.0

    def duration(self, m: int) -> float:
        """Seconds for the next m rounds."""
        alpha, beta = self.coeffs()
        return m * alpha + beta * m * (m - 1) / 2

    def rounds_within(self, dt: float) -> int:
        """How many of the next rounds complete within dt seconds."""
        if dt <= 0:
            return 0
        alpha, beta = self.coeffs()
        if beta <= 0:
            m = int(dt // alpha)
        else:
            b = alpha - beta / 2
            m = int((-b + math.sqrt(b * b + 2 * beta * dt)) / beta)
        while m > 0 and m * alpha + beta * m * (m - 1) / 2 > dt:
            m -= 1
        while (m + 1) * alpha + beta * (m + 1) * m / 2 <= dt:
            m += 1
        return m

    def rounds_to_next_finish(self) -> int | None:
        while self._due and self._members.get(self._due[0][1], (None,))[0] != self._due[0][0]:
            heapq.heappop(self._due)
        return self._due[0][0] - self.rounds if self._due else None

    def add(self, request: int, ctx: int, remaining: int) -> None:
        """Join with ``ctx`` KV tokens; it leaves after ``remaining`` more rounds (>= 1)."""
        finish = self.rounds + remaining
        self._members[request] = (finish, self.rounds)
        self._ctx0[request] = ctx
        self._order.append(request)
        heapq.heappush(self._due, (finish, request))
        self.n += 1
        self.sum_ctx += ctx

    def context(self, request: int) -> int:
        return self._ctx0[request] + self.rounds - self._members[request][1]

    def advance(self, m: int) -> None:
        self.sum_ctx += m * self.n
        self.rounds += m

    def pop_finished(self) -> list[int]:
        done = []
        while self._due and self._due[0][0] <= self.rounds:
            finish, request = heapq.heappop(self._due)
            if self._members.get(request, (None,))[0] == finish:
                self._drop(request)
                done.append(request)
        return done

    def preempt_newest(self) -> tuple[int, int, int]:
        """Remove the most recently joined request: (request, its context, rounds it still needs)."""
        while self._order[-1] not in self._members:
            self._order.pop()
        request = self._order.pop()
        ctx = self.context(request)
        remaining = self._members[request][0] - self.rounds
        self._drop(request)
        return request, ctx, remaining

    def _drop(self, request: int) -> None:
        self.sum_ctx -= self.context(request)
        del self._members[request], self._ctx0[request]
        self.n -= 1
