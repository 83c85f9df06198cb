"""User-facing errors: each carries one line that the CLI prints as is."""


class SpdyError(Exception):
    """A problem with the user's input or environment; the message is the whole explanation."""


PRUNED_SHARE_NOTE = 0.6   # an infeasible target says how little of the time can be pruned, under this share


def _rows_fixed_text(rows: dict[str, int]) -> str:
    """Why a larger batch is not the advice: it gives sparse kernels more rows only where the rows follow
    the batch, and the graph fixes every pruned site's rows (`rows`: {site: rows}, graph.fixed_rows)."""
    named = ", ".join(f"'{name}' {n}" for name, n in list(rows.items())[:3]) + (", ..." if len(rows) > 3 else "")
    return (f"a larger --batch-size would not help: the graph, not the batch, fixes the rows every pruned site "
            f"multiplies ({named} rows at any batch size)")


class InfeasibleTarget(SpdyError):
    def __init__(self, target: float, max_speedup: float, *, margin: float = 0.0, measured: float | None = None,
                 pruned_share: float | None = None, table_note: str = "", left_dense: str = "",
                 rows_fixed: dict[str, int] | None = None):
        """`measured`: the end-to-end speedup of that fastest profile, when it was measured;
        `pruned_share`: the share of the dense model's time in the sites that can be pruned;
        `table_note`: why the table itself may be wrong, when the refusal rests on it alone;
        `left_dense`: why nodes are left dense, named when the pruned share is the limit;
        `rows_fixed`: {site: rows} when the graph fixes every pruned site's rows: then a larger batch is
        not suggested."""
        self.target = target
        self.max_speedup = max_speedup
        self.measured = measured
        if measured is not None:
            text = (f"target {target:g}x is infeasible on this engine: the fastest profile the latency table "
                    f"allows (every prunable site at its fastest level, predicted {max_speedup:.2f}x) measured "
                    f"{measured:.3f}x end to end; ")
            if measured > 1.01:
                text += (f"ask for at most about {measured:.2f}x"
                         + (f" (with the {margin:g} margin, {measured / (1 + margin):.2f}x)" if margin > 0 else ""))
            else:
                text += "pruning does not make this model faster on this engine at this batch size"
            if rows_fixed:
                text += f"; {_rows_fixed_text(rows_fixed)}"
            else:
                text += ", or try a larger --batch-size if you deploy one (sparse kernels pay more there)"
        else:
            text = (f"target {target:g}x is infeasible on this engine: the largest achievable speedup is "
                    f"{max_speedup:.3f}x (with every prunable site at its fastest measured level)")
            bounded = pruned_share is not None and pruned_share < 1 and 1 / (1 - pruned_share) < target
            if max_speedup <= 1.01 and not bounded and rows_fixed:
                text += ("; no sparsity level runs faster than dense here: the pruned layers are too small to "
                         f"pay, and {_rows_fixed_text(rows_fixed)}")
            elif max_speedup <= 1.01 and not bounded:   # when the pruned share is the limit, the batch is not
                text += ("; no sparsity level runs faster than dense here: at this batch size the pruned "
                         "layers are too small to pay, try a larger --batch-size if you deploy one")
        if measured is None and target <= max_speedup < target * (1 + margin):
            # reachable on paper, but not with the safety margin the measurement must clear
            text += (f", under the {target * (1 + margin):.3f}x that target x (1 + margin {margin:g}) requires; "
                     "lower the target, or --margin 0 to accept no safety margin")
        if pruned_share is not None and 0 <= pruned_share < PRUNED_SHARE_NOTE:
            bound = 1 / (1 - pruned_share)
            text += (f". The prunable sites take {pruned_share:.0%} of the dense model's time on this engine: even "
                     f"with them removed entirely it could run at most {bound:.{3 if bound < 1.1 else 2}f}x faster "
                     "(the rest is ops that are not pruned, such as recurrent layers, attention, normalisation, "
                     "or sites left dense)")
            if left_dense:
                text += f". Left dense: {left_dense}"
        if measured is None and table_note:
            text += f". {table_note}"
        super().__init__(text)


# how much less to suggest when the engine's measurements straddle the target
NEAR_TARGET = 0.03


class TargetMissed(SpdyError):
    def __init__(self, target: float, measured: float, attempts: int, *, best: float | None = None,
                 fastest: tuple[float, float] | None = None, batch_size: int | None = None,
                 required: float | None = None, report_path=None, rows_fixed: dict[str, int] | None = None):
        """`best`: the highest speedup measured; `fastest`: (predicted, measured) of the fastest profile the
        latency table allows, when it was tried: then the engine, not the search, is the limit;
        `required`: what a measurement had to clear (the target plus the noise margin);
        `rows_fixed`: as for InfeasibleTarget."""
        self.target = target
        self.measured = measured
        self.best = measured if best is None else best
        if required is not None and measured >= target:   # "1.306x missed 1.3x" reads as a contradiction
            text = (f"measured speedup {measured:.3f}x is over the target {target:g}x but under the {required:.3f}x "
                    f"a measurement must clear (the target plus the margin for timing noise, --margin) after "
                    f"{attempts} attempt(s)")
        else:
            text = f"measured speedup {measured:.3f}x missed the target {target:g}x after {attempts} attempt(s)"
        if best is not None and best > measured + 5e-4:
            text += f" (best {best:.3f}x)"
        if fastest is not None:
            at = f" at batch {batch_size}" if batch_size else ""
            reached = max(self.best, fastest[1])
            text += (f"; the fastest profile the latency table allows (predicted {fastest[0]:.2f}x) measured "
                     f"{fastest[1]:.3f}x end to end, so this engine does not reach {target:g}x on this "
                     f"model{at}")
            if reached < target:
                text += f": ask for at most about {reached:.2f}x"
            else:   # it reached the target, but not with the margin the guarantee needs
                text += (f" with the margin the guarantee needs (its measurements vary from compile to "
                         f"compile): ask for a little less, about {target / (1 + NEAR_TARGET):.2f}x, or "
                         "measure on a quieter machine")
            if batch_size == 1 and rows_fixed:
                text += f"; {_rows_fixed_text(rows_fixed)}"
            elif batch_size == 1:
                text += ", or try a larger --batch-size if you deploy one (sparse kernels pay more there)"
        where = f": {report_path}" if report_path is not None else ""
        super().__init__(text + f"; no model was written (see the report for every attempt{where})")
