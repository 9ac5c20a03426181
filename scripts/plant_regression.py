"""Plant a silent regression in a distilled method and show what `sfdbench check` makes of it.

The plant: first-stage SFD trains for ``--fraction`` of its iterations (its LR drop moves with it)
while its records keep the configured hyperparameters, so the configuration hash equals the
reference's, as it would for a real bug in the training loop. The suite's check-grid SFD entry
(unguided) is run with the check's seeds and sample count into ``--out``, then compared with the
committed references under the paired rule (measured tolerances, ``results/reference/<suite>/
tolerances.json``) and under the old unpaired rule (``docs/reporting.md#regression-gate``).

    OMP_NUM_THREADS=1 nice python scripts/plant_regression.py --fraction 0.5 --out /tmp/planted
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="digits")
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of SFD's iterations actually trained")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", type=Path, default=Path("results/reference"))
    args = parser.parse_args()

    import sfdbench.methods.sfd as sfd
    from sfdbench.harness.runner import RunPlan, run
    from sfdbench.records import load_records
    from sfdbench.report.check import compare, load_tolerances
    from sfdbench.suites import get_suite

    real_train = sfd.train_sfd

    def planted(ctx, hp, method="sfd"):
        return real_train(ctx, {**hp, "iterations": max(1, round(hp["iterations"] * args.fraction))}, method)

    sfd.train_sfd = planted
    suite = get_suite(args.suite)
    grid = [(e.method, n, e.guidance) for e in suite.check_grid for n in e.nfes
            if e.method == "sfd" and (e.guidance if e.guidance is not None else suite.guidance) == 1.0]
    if not grid:
        parser.error(f"{suite.name}'s check grid has no unguided SFD entry")
    run(RunPlan(suite=suite.name, grid=grid, seeds=list(suite.check_seeds), samples=suite.check_samples,
                out=args.out, command=f"scripts/plant_regression.py --fraction {args.fraction}"))
    fresh = load_records(args.out, suite.name)
    ref = load_records(args.reference, suite.name)
    ref = ref[ref["method"].isin(fresh["method"]) & ref["nfe"].isin(fresh["nfe"])
              & (ref["guidance"] == 1.0)]
    columns = ["method", "nfe", "metric", "reference", "fresh", "delta", "max_abs_paired", "tolerance", "rule",
               "status"]
    for name, tolerances in (("paired (measured tolerances)", load_tolerances(args.reference, suite.name)),
                             ("old unpaired rule", {})):
        result = compare(fresh, ref, tolerances)
        print(f"\n{name}:\n" + result[result["metric"] == "fid"][columns].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
