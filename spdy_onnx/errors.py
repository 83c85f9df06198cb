"""User-facing errors: each carries one line that the CLI prints as is."""


class SpdyError(Exception):
    """A problem with the user's input or environment; the message is the whole explanation."""


class InfeasibleTarget(SpdyError):
    def __init__(self, target: float, max_speedup: float):
        self.target = target
        self.max_speedup = max_speedup
        super().__init__(
            f"target {target:g}x is infeasible on this engine: the largest achievable speedup is "
            f"{max_speedup:.3f}x (with every prunable site at its fastest measured level)"
        )


class TargetMissed(SpdyError):
    def __init__(self, target: float, measured: float, attempts: int):
        self.target = target
        self.measured = measured
        super().__init__(
            f"measured speedup {measured:.3f}x missed the target {target:g}x after {attempts} "
            f"attempt(s); no model was written (see the report for every attempt)"
        )
