"""Paper scale by arithmetic: the plans of the preset spaces on ImageNet-1k (train/ holds
1,281,167 images, of which the splits' rule holds 10 % out as the selection split; val/'s
50,000 are the test split; 1,000 classes) with ``difftune plan``'s arithmetic, checked
elsewhere against measured runs (tests/search/test_plan.py: entry sizes against written
entries, ASHA's expected epochs against Ray Tune's scheduler; tests/search/test_plan_rungs.py:
each rung's sample against the real splits; tests/trainables/test_cost.py: activation bytes
against a measured peak). No checkpoint, no data. Both ways are priced alike: each U-Net pass
at the GFLOPs to the deepest block it needs, each trial at the epochs ASHA lets it run in
expectation (every epoch beside it), head training (3 forwards per train image and 1 per val
image each epoch) at the same rate on both sides. Each space is planned as the preset has it
(rungs over images), without its rungs (the single-fidelity search), with the probe rung,
and the paper's way (without rungs, and on the same rungs). The rate is ``--img-per-s`` (to
the deepest block) if given, else the plan's default (40 TFLOP/s effective). Prints the
tables of docs/paper-scale.md and the README and appends one row to benchmarks/RESULTS.md.

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


def total(plan: Plan) -> float:
    """GPU-hours of a plan's U-Net passes and head training."""
    return plan.gpu_hours + plan.head_gpu_hours


def paper_total(plan: Plan) -> float:
    return plan.gpu_hours_paper + plan.head_gpu_hours_paper


def variant(name: str, rungs: str, **search) -> Space:
    """The preset ``name`` as it is (``rungs`` "preset"), without rungs ("none") or with
    the probe rung ("probe"), with ``search`` settings pinned."""
    space = load_space(name)
    if rungs == "none":
        space.search["image_rungs"] = None
    elif rungs == "probe":
        space.search["probe_rung"] = True
    space.search.update(search)
    return space


def plans(name: str, budget: int, img_per_s: float | None) -> dict[str, dict[str, Plan]]:
    """Per variant (preset, none, probe: the last only for a preset with rungs): the plan
    with no budget (``auto``), each policy forced, and under ``budget``."""
    out: dict[str, dict[str, Plan]] = {}
    kinds = ["preset", "none"] + (["probe"] if load_space(name).search.get("image_rungs")
                                  else [])
    for kind in kinds:
        space = variant(name, kind)
        data = imagenet(space)
        auto = make_plan(space, data, budget=None, budget_source="none", img_per_s=img_per_s)
        got = {"auto": auto}
        if kind != "probe":
            got["budget"] = make_plan(space, data, budget=budget,
                                      budget_source="--cache-budget", img_per_s=img_per_s)
            for policy in auto.policies:
                got[policy] = make_plan(variant(name, kind, cache_policy=policy), data,
                                        budget=None, budget_source="none",
                                        img_per_s=img_per_s)
        out[kind] = got
    return out


def _rungs(plan: Plan) -> str:
    if not plan.rungs:
        return "none"
    fr = ", ".join(f"{f:g}" for f in plan.rungs["fractions"])
    return f"[{fr}]" + (" + probe" if plan.rungs["probe"] else "")


def _row(name: str, plan: Plan, budget: str, policy: str, cache: str, paper: float) -> str:
    return (f"| `{name}` | {_rungs(plan)} | {budget} | {policy} | {cache} | "
            f"{_m(plan.unet_image_passes)} | {_h(plan.gpu_hours)} | {_h(plan.head_gpu_hours)} "
            f"| {paper / total(plan):.3g}x |")


def rows(name: str, got: dict[str, dict[str, Plan]], budget: str) -> list[str]:
    """The rows of one space in the table of docs/paper-scale.md."""
    out = []
    paper = paper_total(got["none"]["auto"])
    for kind in ("preset", "none"):
        auto = got[kind]["auto"]
        for policy, plan in got[kind].items():
            if policy in ("auto", "budget"):
                continue
            cache = format_size(plan.cache_bytes_bound)
            if policy == "per-request":
                cache = (f"{format_size(plan.cache_bytes_unevicted)} unevicted; "
                         f"{plan.max_concurrent} trials at once need "
                         f"{format_size(plan.working_set_bytes)}")
            chosen = " (chosen)" if policy == auto.policy else ""
            out.append(_row(name, plan, "none", policy + chosen, cache, paper))
        fit = got[kind]["budget"]
        if fit.fits:
            out.append(_row(name, fit, budget, fit.policy,
                            f"<= {format_size(fit.cache_bytes_bound)}", paper))
        else:
            out.append(f"| `{name}` | {_rungs(fit)} | {budget} | refused: fits with "
                       + " or ".join(f"`{c}`" for c in fit.changes[:2]) + " | | | | | |")
        if kind == "preset" and "probe" in got:
            probe = got["probe"]["auto"]
            out.append(_row(name, probe, "none", probe.policy,
                            format_size(probe.cache_bytes_bound), paper))
    single, ours = got["none"]["auto"], got["preset"]["auto"]
    out.append(f"| `{name}`, the paper's way | none | | | none | "
               f"{_m(single.unet_image_passes_paper)} ({single.expected_epochs:.3g} epochs per "
               f"trial); {_m(single.unet_image_passes_paper_bound)} at every epoch | "
               f"{_h(single.gpu_hours_paper)}; {_h(single.gpu_hours_paper_bound)} at every "
               f"epoch | {_h(single.head_gpu_hours_paper)} | 1x |")
    if ours.rungs:
        pr = ours.rungs["paper_rungs"]
        out.append(f"| `{name}`, the paper's way on the same rungs | {_rungs(ours)} | | | "
                   f"none | {_m(pr['image_passes'])} (every epoch of each rung) | "
                   f"{_h(pr['gpu_hours'])} | {_h(pr['head_gpu_hours'])} | "
                   f"{paper / (pr['gpu_hours'] + pr['head_gpu_hours']):.3g}x |")
    return out


def rung_rows(name: str, plan: Plan) -> list[str]:
    """The per-rung rows of a plan with rungs (the table `difftune plan` prints)."""
    r = plan.rungs
    out = []
    if r["probe"]:
        p = r["probe"]
        out.append(f"| `{name}` | probe | {r['fractions'][0]:g} | | {p['train_rows']:,} | "
                   f"{p['val_rows']:,} | {_m(p['image_passes'])} | in rung 0's | "
                   f"{_h(p['gpu_hours'])} | |")
    for row in r["rows"]:
        out.append(f"| `{name}` | {row['rung']} | {row['fraction']:g} | {row['trials']:.3g} | "
                   f"{row['train_rows']:,} | {row['val_rows']:,} | "
                   f"{_m(row['image_passes'])} | {format_size(row['cache_bytes'])} | "
                   f"{_h(row['gpu_hours'])} | {_h(row['head_gpu_hours'])} |")
    return out


def values_of(name: str, got: dict[str, dict[str, Plan]]) -> dict[str, object]:
    """The RESULTS row's values of one space."""
    auto, single = got["preset"]["auto"], got["none"]["auto"]
    fit = got["preset"]["budget"]
    paper = paper_total(single)
    v: dict[str, object] = {
        f"{name}_rungs": _rungs(auto).strip("[]").replace(" ", ""),
        f"{name}_policy": auto.policy, f"{name}_passes": auto.unet_image_passes,
        f"{name}_gpu_h": auto.gpu_hours, f"{name}_head_gpu_h": auto.head_gpu_hours,
        f"{name}_total_gpu_h": total(auto),
        **{f"{name}_gpu_h_{p.replace('-', '_')}": f.gpu_hours
           for p, f in got["preset"].items() if p not in ("auto", "budget")},
        f"{name}_cache": format_size(auto.cache_bytes_bound),
        f"{name}_single_policy": single.policy, f"{name}_single_passes": single.unet_image_passes,
        f"{name}_single_gpu_h": single.gpu_hours,
        f"{name}_single_head_gpu_h": single.head_gpu_hours,
        f"{name}_single_total_gpu_h": total(single),
        f"{name}_single_cache": format_size(single.cache_bytes_bound),
        f"{name}_passes_paper": single.unet_image_passes_paper,
        f"{name}_passes_paper_every_epoch": single.unet_image_passes_paper_bound,
        f"{name}_gpu_h_paper": single.gpu_hours_paper,
        f"{name}_gpu_h_paper_every_epoch": single.gpu_hours_paper_bound,
        f"{name}_head_gpu_h_paper": single.head_gpu_hours_paper,
        f"{name}_total_gpu_h_paper": paper,
        f"{name}_ratio": paper / total(auto),
        f"{name}_single_ratio": paper / total(single),
        f"{name}_rungs_vs_single": total(single) / total(auto),
        f"{name}_expected_epochs": single.expected_epochs,
        f"{name}_trial_gflops": auto.trial_gflops_per_image,
        f"{name}_deepest_gflops": auto.gflops_per_image,
        f"{name}_head_gflops": auto.head_gflops_per_image,
        f"{name}_test_passes": auto.test["image_passes"],
        f"{name}_test_gpu_h": auto.test["gpu_hours"],
        f"{name}_budget_policy": fit.policy, f"{name}_budget_fits": fit.fits,
        f"{name}_budget_cache": format_size(fit.cache_bytes_bound),
        f"{name}_budget_gpu_h": fit.gpu_hours,
    }
    if auto.rungs:
        pr = auto.rungs["paper_rungs"]
        v[f"{name}_paper_rungs_total_gpu_h"] = pr["gpu_hours"] + pr["head_gpu_hours"]
        v[f"{name}_paper_rungs_ratio"] = (pr["gpu_hours"] + pr["head_gpu_hours"]) / total(auto)
        v[f"{name}_rung_trials"] = "/".join(f"{r['trials']:.3g}" for r in auto.rungs["rows"])
    if "probe" in got:
        probe = got["probe"]["auto"]
        v.update({f"{name}_probe_passes": probe.rungs["probe"]["image_passes"],
                  f"{name}_probe_gpu_h": probe.rungs["probe"]["gpu_hours"],
                  f"{name}_probe_total_gpu_h": total(probe),
                  f"{name}_probe_ratio": paper / total(probe)})
    return v


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--spaces", default="linear,difformer")
    parser.add_argument("--budget", default="2TB")
    parser.add_argument("--img-per-s", type=float)
    args = parser.parse_args(argv)
    configure()
    budget = parse_size(args.budget)
    values: dict[str, object] = {"budget": args.budget}
    table = ["| space | image rungs | budget | cache policy | cache | U-Net image-passes | "
             "U-Net GPU-hours | head GPU-hours | the paper's way / this (U-Net + heads) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_rung = ["| space | rung | fraction | trials | train images | val images | "
                "U-Net image-passes | cache added | U-Net GPU-hours | head GPU-hours |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    tests = ["| space | test images | evaluations | image-passes | GPU-hours |",
             "| --- | --- | --- | --- | --- |"]
    readme = ["| search on ImageNet-1k | U-Net image-passes | GPU-hours (U-Net + heads) | "
              "the paper's way / this |", "| --- | --- | --- | --- |"]
    for name in args.spaces.split(","):
        got = plans(name, budget, args.img_per_s)
        auto, single = got["preset"]["auto"], got["none"]["auto"]
        print(f"{name}: as the preset has it: {auto.summary()}")
        print(f"{name}: without rungs: {single.summary()}")
        fit = got["preset"]["budget"]
        print(f"{name}: {args.budget}: {fit.summary()}"
              + ("" if fit.fits else f"; changes that fit: {'; '.join(fit.changes)}"))
        table += rows(name, got, args.budget)
        if auto.rungs:
            per_rung += rung_rows(name, got.get("probe", got["preset"])["auto"])
        t = auto.test
        tests.append(f"| `{name}` | {t['images']:,} | {t['evaluations']} | "
                     f"{t['image_passes']:,} | {t['gpu_hours']:.3g} |")
        paper = paper_total(single)
        for label, plan in ((f"`{name}`, {_rungs(auto)} rungs", auto),
                            (f"`{name}`, without rungs", single)):
            readme.append(f"| {label} | {_m(plan.unet_image_passes)} | {_h(total(plan))} | "
                          f"{paper / total(plan):.3g}x |")
        readme.append(f"| `{name}`, the paper's way | {_m(single.unet_image_passes_paper)} | "
                      f"{_h(paper)} | 1x |")
        values.update(values_of(name, got))
    print("\n".join(["", *table, "", *per_rung, "", *tests, "", *readme, ""]))
    record("paper_scale", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
