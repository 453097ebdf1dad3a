"""Paper scale by arithmetic: the plans of the preset spaces on ImageNet-1k (train/ holds
1,281,167 images, of which the splits' rule holds 10 % out as the selection split; val/'s
50,000 are the test split; 1,000 classes) with ``difftune plan``'s arithmetic, checked
elsewhere against measured runs (tests/search/test_plan.py: entry sizes against written
entries, ASHA's expected epochs against Ray Tune's scheduler; tests/trainables/test_cost.py:
activation bytes against a measured peak). No checkpoint, no data. Both ways are priced
alike: each U-Net pass at the GFLOPs to the deepest block it needs, each trial at the epochs
ASHA lets it run in expectation (every epoch beside it). The rate is ``--img-per-s`` (to
the deepest block) if given, else the plan's default (40 TFLOP/s effective). Prints the
tables of docs/paper-scale.md and appends one row to benchmarks/RESULTS.md.

    python -m benchmarks.paper_scale [--spaces linear,difformer] [--budget 2TB]
"""

from __future__ import annotations

import sys

from benchmarks._results import arguments, configure, record
from difftune.search.plan.data import DataSize
from difftune.search.plan.estimate import Plan, make_plan
from difftune.search.space.sizes import format_size, parse_size
from difftune.search.space.spec import Space, load_space

IMAGES, CLASSES, TEST = 1_281_167, 1000, 50_000


def imagenet(space: Space) -> DataSize:
    """ImageNet-1k by the splits' rule: val is the space's holdout of train/, test is val/."""
    return DataSize.folder_layout(IMAGES, CLASSES, test=TEST,
                                  holdout=space.setting("holdout"), source="ImageNet-1k")


def _m(n: float) -> str:
    return f"{n / 1e9:.3g} G" if n >= 1e9 else f"{n / 1e6:.3g} M"


def _h(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def rows(name: str, auto: Plan, fit: Plan, forced: dict[str, Plan], budget: str) -> list[str]:
    """The rows of one space in the table of docs/paper-scale.md."""
    out = []
    for policy, plan in forced.items():
        cache = format_size(plan.cache_bytes_bound)
        if policy == "per-request":
            cache = (f"{format_size(plan.cache_bytes_unevicted)} unevicted; "
                     f"{plan.max_concurrent} trials at once need "
                     f"{format_size(plan.working_set_bytes)}")
        chosen = " (chosen)" if policy == auto.policy else ""
        out.append(f"| `{name}` | none | {policy}{chosen} | {cache} | "
                   f"{_m(plan.unet_image_passes)} | {_h(plan.gpu_hours)} | "
                   f"{auto.gpu_hours_paper / plan.gpu_hours:.3g}x |")
    if fit.fits:
        out.append(f"| `{name}` | {budget} | {fit.policy} | <= {format_size(fit.cache_bytes_bound)} "
                   f"| {_m(fit.unet_image_passes)} | {_h(fit.gpu_hours)} | "
                   f"{auto.gpu_hours_paper / fit.gpu_hours:.3g}x |")
    else:
        out.append(f"| `{name}` | {budget} | refused: fits with "
                   + " or ".join(f"`{c}`" for c in fit.changes[:2]) + " | | | | |")
    out.append(f"| `{name}`, the paper's way | | | none | {_m(auto.unet_image_passes_paper)} "
               f"({auto.expected_epochs:.3g} epochs per trial); "
               f"{_m(auto.unet_image_passes_paper_bound)} at every epoch | "
               f"{_h(auto.gpu_hours_paper)}; {_h(auto.gpu_hours_paper_bound)} at every epoch "
               "| 1x |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--spaces", default="linear,difformer")
    parser.add_argument("--budget", default="2TB")
    parser.add_argument("--img-per-s", type=float)
    args = parser.parse_args(argv)
    configure()
    budget = parse_size(args.budget)
    values: dict[str, object] = {"budget": args.budget}
    table = ["| space | budget | cache policy | cache | U-Net image-passes | GPU-hours | "
             "the paper's way / this |", "| --- | --- | --- | --- | --- | --- | --- |"]
    tests = ["| space | test images | evaluations | image-passes | GPU-hours |",
             "| --- | --- | --- | --- | --- |"]
    for name in args.spaces.split(","):
        space = load_space(name)
        data = imagenet(space)
        auto = make_plan(space, data, budget=None, budget_source="none",
                         img_per_s=args.img_per_s)
        fit = make_plan(space, data, budget=budget, budget_source="--cache-budget",
                        img_per_s=args.img_per_s)
        forced = {}
        for policy in auto.policies:
            pinned = load_space(name)
            pinned.search["cache_policy"] = policy
            forced[policy] = make_plan(pinned, data, budget=None, budget_source="none",
                                       img_per_s=args.img_per_s)
        print(f"{name}: unlimited: {auto.summary()}")
        print(f"{name}: {args.budget}: {fit.summary()}"
              + ("" if fit.fits else f"; changes that fit: {'; '.join(fit.changes)}"))
        table += rows(name, auto, fit, forced, args.budget)
        t = auto.test
        tests.append(f"| `{name}` | {t['images']:,} | {t['evaluations']} | "
                     f"{t['image_passes']:,} | {t['gpu_hours']:.3g} |")
        values.update({
            f"{name}_policy": auto.policy, f"{name}_passes": auto.unet_image_passes,
            f"{name}_gpu_h": auto.gpu_hours,
            **{f"{name}_gpu_h_{p.replace('-', '_')}": f.gpu_hours for p, f in forced.items()},
            f"{name}_passes_paper": auto.unet_image_passes_paper,
            f"{name}_passes_paper_every_epoch": auto.unet_image_passes_paper_bound,
            f"{name}_gpu_h_paper": auto.gpu_hours_paper,
            f"{name}_gpu_h_paper_every_epoch": auto.gpu_hours_paper_bound,
            f"{name}_ratio": auto.gpu_hours_paper / auto.gpu_hours,
            f"{name}_expected_epochs": auto.expected_epochs,
            f"{name}_trial_gflops": auto.trial_gflops_per_image,
            f"{name}_deepest_gflops": auto.gflops_per_image,
            f"{name}_test_passes": auto.test["image_passes"],
            f"{name}_test_gpu_h": auto.test["gpu_hours"],
            f"{name}_cache_blockset": format_size(auto.policies["block-set"]["cache_bytes"])
            if "block-set" in auto.policies else "none",
            f"{name}_budget_policy": fit.policy, f"{name}_budget_fits": fit.fits,
            f"{name}_budget_cache": format_size(fit.cache_bytes_bound),
            f"{name}_budget_passes": fit.unet_image_passes,
            f"{name}_budget_gpu_h": fit.gpu_hours})
    print("\n".join(["", *table, "", *tests, ""]))
    record("paper_scale", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
