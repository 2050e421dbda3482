"""Tolerance: how many quantization steps (LSB) a candidate may be off, and the named cause why.

Exact by default (:data:`EXACT`); each relaxation (a fixed number of steps, a budget per
requantization depth, a fraction of elements one step more, a lowered engine's kernel contract)
needs a cause, which every message repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "EXACT"]


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate's integers may be from the reference's, and why.

    At a point ``depth`` requantizations away from the graph inputs the allowed difference is
    ``lsb + per_depth * depth`` steps; with ``off_by_one_fraction`` set, up to that fraction of
    a point's elements may exceed it by exactly one more step. Any relaxation needs a cause.
    """

    lsb: int = 0
    off_by_one_fraction: float | None = None
    per_depth: int = 0
    cause: str = ""

    def __post_init__(self):
        if self.lsb < 0 or self.per_depth < 0:
            raise ValueError(f"tolerance steps must be >= 0, got lsb={self.lsb}, per_depth={self.per_depth}")
        if self.off_by_one_fraction is not None and not 0 <= self.off_by_one_fraction <= 1:
            raise ValueError(f"off_by_one_fraction must be in [0, 1], got {self.off_by_one_fraction}")
        if not self.is_exact and not self.cause:
            raise ValueError("a relaxed tolerance needs a cause (why the converter may differ)")

    @property
    def is_exact(self) -> bool:
        return self.lsb == 0 and self.per_depth == 0 and not self.off_by_one_fraction

    def allowed(self, depth: int) -> int:
        """Steps allowed at a point ``depth`` requantizations from the graph inputs."""
        return self.lsb + self.per_depth * depth

    # Constructors: each says what it relaxes; the cause says why.
    @classmethod
    def within(cls, lsb: int, cause: str) -> Tolerance:
        return cls(lsb=lsb, cause=cause)

    @classmethod
    def depth_budget(cls, per_depth: int, cause: str, lsb: int = 0) -> Tolerance:
        return cls(lsb=lsb, per_depth=per_depth, cause=cause)

    @classmethod
    def off_by_one(cls, fraction: float, cause: str, lsb: int = 0) -> Tolerance:
        return cls(lsb=lsb, off_by_one_fraction=fraction, cause=cause)

    @classmethod
    def kernel(cls, engine: str, compounding: bool = False) -> Tolerance:
        """The contract of a lowered model on ``engine`` (qref.engines.KERNEL_CONTRACTS).

        The contract is per kernel, given the reference's quantized input (``compare_lowered``
        isolates points by default). ``compounding=True``: the same steps per requantization
        on the way, for end-to-end comparisons (ExecuTorch widened back-to-back convs the same way).
        """
        from ..engines import KERNEL_CONTRACTS

        contract = KERNEL_CONTRACTS.get(engine)
        if contract is None:
            known = ", ".join(KERNEL_CONTRACTS)
            raise ValueError(f"no kernel contract for engine {engine!r}; known: {known}")
        cause = (
            f"{engine} kernel contract: a lowered kernel is within {contract.max_lsb} LSB of the "
            "reference given the same quantized input (it requantizes in integer arithmetic, the "
            f"reference rounds a float){'; compounding once per requantization' if compounding else ''}; "
            f"caveat: {contract.note}"
        )
        if compounding:
            return cls(per_depth=contract.max_lsb, cause=cause)
        return cls(lsb=contract.max_lsb, cause=cause)

    def __str__(self) -> str:
        if self.is_exact:
            return "exact" + (f" ({self.cause})" if self.cause else "")
        parts = [f"<= {self.lsb} LSB"] if self.lsb or not self.per_depth else ["<="]
        if self.per_depth:
            parts.append(("+ " if self.lsb else "") + f"{self.per_depth} LSB per requantization depth")
        if self.off_by_one_fraction:
            parts.append(f"and up to {self.off_by_one_fraction:.3g} of elements one step more")
        return " ".join(parts) + f" ({self.cause})"


EXACT = Tolerance(cause="the reference conversion is the specification")
