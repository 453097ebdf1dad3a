"""Paper scale by arithmetic: the plans of the preset spaces on ImageNet-1k (1,281,167 train
images, 50,000 val, 1,000 classes) with ``difftune plan``'s arithmetic, checked elsewhere
against measured runs (tests/search/test_plan.py: entry sizes against written entries;
tests/trainables/test_cost.py: activation bytes against a measured peak). No checkpoint, no
data. The rate is ``--img-per-s`` if given, else the plan's default (40 TFLOP/s effective).

    python -m benchmarks.paper_scale [--spaces linear,difformer] [--budget 2TB]
"""

from __future__ import annotations

import sys

from benchmarks._results import arguments, configure, record
from difftune.search.plan.estimate import DataSize, make_plan
from difftune.search.plan.sizes import format_size, parse_size
from difftune.search.space.spec import load_space

IMAGENET = DataSize(train_all=1_281_167, val=50_000, classes=1000, source="ImageNet-1k")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--spaces", default="linear,difformer")
    parser.add_argument("--budget", default="2TB")
    parser.add_argument("--img-per-s", type=float)
    args = parser.parse_args(argv)
    configure()
    budget = parse_size(args.budget)
    values: dict[str, object] = {"budget": args.budget}
    for name in args.spaces.split(","):
        space = load_space(name)
        unlimited = make_plan(space, IMAGENET, budget=None, budget_source="none",
                              img_per_s=args.img_per_s)
        fit = make_plan(space, IMAGENET, budget=budget, budget_source="--cache-budget",
                        img_per_s=args.img_per_s)
        print(f"{name}: unlimited: {unlimited.summary()}")
        print(f"{name}: {args.budget}: {fit.summary()}"
              + ("" if fit.fits else f"; changes that fit: {'; '.join(fit.changes)}"))
        values.update({
            f"{name}_passes": unlimited.unet_image_passes,
            f"{name}_passes_paper": unlimited.unet_image_passes_paper,
            f"{name}_gpu_h": unlimited.gpu_hours, f"{name}_gpu_h_paper": unlimited.gpu_hours_paper,
            f"{name}_img_s": unlimited.img_per_s,
            f"{name}_cache_blockset": format_size(unlimited.cache_bytes_bound),
            f"{name}_budget_policy": fit.policy, f"{name}_budget_fits": fit.fits,
            f"{name}_budget_cache": format_size(fit.cache_bytes_bound),
            f"{name}_budget_passes": fit.unet_image_passes,
            f"{name}_budget_gpu_h": fit.gpu_hours})
    record("paper_scale", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
