"""`hmoe rules explain|validate|tune`: placement rules, checked and shown before anything is loaded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import config_from_dict, load_config
from ..errors import HmoeError
from ..make_model import PRESETS, preset_config

DEFAULT_CTX = 4096  # as chat and generate


def register(sub) -> None:
    p = sub.add_parser("rules", help="explain, validate or tune placement rules (what runs where)",
                       description="Placement rules say which device, op and format each module of the model uses. "
                                   "See docs/rules.md for the format.")
    actions = p.add_subparsers(dest="rules_action", metavar="ACTION", required=True)

    e = actions.add_parser("explain", help="show the plan: each module's device, op, format and bytes, and the totals",
                           description="Plan a model with a rules file from its config alone (no weights are read): "
                                       "a table grouped by layer ranges, then totals per device against free VRAM and "
                                       "available RAM. Exits 2 if the plan does not fit, saying what to change.")
    _model_args(e)
    e.add_argument("--rules", "-r", metavar="FILE",
                   help="rules file, or the name of a shipped one (see rules/); default: the tuner's choice for "
                        "this model and machine")
    _ctx_arg(e)
    e.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    _machine_args(e)

    v = actions.add_parser("validate", help="check a rules file (syntax, keys, regexes, ops, devices, formats)",
                           description="Check a rules file without a model; with --model or --preset also check it "
                                       "against that model (ops per module kind, block sizes) and warn about rules "
                                       "that place nothing.")
    v.add_argument("file", metavar="FILE", help="rules file, or the name of a shipped one")
    _model_args(v, required=False)
    _ctx_arg(v)
    _machine_args(v)

    t = actions.add_parser("tune", help="write rules that put as much on the GPU as fits, in decode order",
                           description="Write a rules file for this model and machine (or the one described by --vram "
                                       "and --ram): attention, cache, dense and shared experts first, then whole layers "
                                       "of routed experts, then N experts per layer; the rest on the CPU in the most "
                                       "precise format that fits RAM. Prints the reasoning.")
    _model_args(t)
    t.add_argument("--vram", default=None, metavar="GiB",
                   help="free VRAM of the GPU to plan for (default: cuda:0's free memory now; 0: no GPU)")
    t.add_argument("--ram", type=float, default=None, metavar="GiB", help="available RAM (default: available now)")
    _ctx_arg(t)
    t.add_argument("--expert-quant", default="auto", metavar="FORMAT",
                   help="format of the routed experts on the CPU (bf16, q8_0, q6_k, q4_k, q4_0; "
                        "default auto: the most precise that fits)")
    t.add_argument("-o", "--out", required=True, metavar="FILE", help="rules file to write")
    p.set_defaults(func=run)


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--model", "-m", metavar="DIR|GGUF",
                   help="model directory or .gguf file (only config.json or the GGUF's metadata is read)")
    g.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape instead of a directory (e.g. v3)")


def _ctx_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context in tokens to size the latent cache for (default 4096, or the model's limit if smaller)")


def _machine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram", default=None, metavar="GiB[,GiB...]",
                   help="plan for GPUs with this much free memory each, e.g. 24 or 80,80 (default: this machine's "
                        "GPUs; 0: no GPU)")
    p.add_argument("--ram", type=float, default=None, metavar="GiB",
                   help="plan for this much available RAM (default: available now)")


def run(args) -> int:
    return {"explain": _explain, "validate": _validate, "tune": _tune}[args.rules_action](args)


def _model(args):
    if args.preset:
        cfg, label = config_from_dict(preset_config(args.preset), source=f"preset {args.preset}"), f"preset {args.preset}"
    else:
        cfg, label = load_config(args.model), str(args.model)
    if args.ctx is None:
        args.ctx = min(DEFAULT_CTX, cfg.max_position_embeddings)
    return cfg, label


def _inventory(args, first_gpu_only: bool = False):
    """This machine, with the GPUs and RAM replaced by --vram / --ram where given."""
    from placement.inventory import GiB, Gpu, Inventory, detect

    machine = detect()
    gpus = machine.gpus[:1] if first_gpu_only else machine.gpus
    if args.vram is not None:
        try:
            sizes = [float(v) for v in str(args.vram).split(",")]
        except ValueError:
            raise HmoeError(f"--vram must be GiB per GPU like 24 or 80,80, found '{args.vram}'") from None
        gpus = tuple(Gpu(i, "hypothetical", int(v * GiB)) for i, v in enumerate(v for v in sizes if v > 0))
    ram = machine.ram_bytes if args.ram is None else int(args.ram * GiB)
    return Inventory(gpus, ram, machine.numa_nodes, detected=args.vram is None)


def _explain(args) -> int:
    from placement import explain, preflight
    from placement.defaults import default_rules, open_rules
    from placement.plan import build_plan

    cfg, label = _model(args)
    inventory = _inventory(args)
    if args.rules:
        rules = open_rules(args.rules, inventory)
    else:  # as chat and generate choose them (a GGUF keeps its experts' format)
        from ..session import default_expert_quant

        quant = default_expert_quant(args.model, "auto") if args.model else "auto"
        rules = default_rules(cfg, inventory, ctx=args.ctx, expert_quant=quant)
    from ..session import stored_expert_formats

    plan = build_plan(rules, cfg, ctx=args.ctx, numa_nodes=inventory.numa_nodes,
                      stored_experts=stored_expert_formats(args.model))
    result = preflight.fits(plan, inventory)
    for w in plan.warnings:
        print(f"hmoe: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(explain.to_json(plan, result, label), indent=1))
    else:
        print(explain.render(plan, result, label))
    preflight.check(plan, inventory)  # refuses (exit 2) with what to change
    return 0


def _validate(args) -> int:
    from placement.defaults import open_rules
    from placement.plan import build_plan

    inventory = _inventory(args)
    rules = open_rules(args.file, inventory)
    what = f"{len(rules.rules)} rules"
    if args.model or args.preset:
        cfg, label = _model(args)
        from ..session import stored_expert_formats

        plan = build_plan(rules, cfg, ctx=args.ctx, numa_nodes=inventory.numa_nodes,
                          stored_experts=stored_expert_formats(args.model))
        for w in plan.warnings:
            print(f"hmoe: warning: {w}", file=sys.stderr)
        defaulted = sum(p.rule is None for p in plan.placements)
        what += f", {len(plan.placements)} modules of {label} placed ({defaulted} by defaults)"
    print(f"{rules.source}: ok ({what})")
    return 0


def _tune(args) -> int:
    from placement.preflight import gib
    from placement.tune import tune

    cfg, label = _model(args)
    inventory = _inventory(args, first_gpu_only=True)
    out = Path(args.out)
    tuned = tune(cfg, inventory, ctx=args.ctx, expert_quant=args.expert_quant, source=str(out))
    for r in tuned.reasons:
        print(f"- {r}")
    out.write_text(tuned.text)
    usage = ", ".join(f"{d} {gib(u.total)}" for d, u in tuned.plan.usage().items())
    print(f"wrote {out} for {label} ({usage})")
    return 0
