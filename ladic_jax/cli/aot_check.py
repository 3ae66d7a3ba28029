"""ladic-aot-check (scripts/aot_check.py): will this config fit on that TPU slice? Compiles its train
step and sampler for the topology here, on the CPU (libtpu from the tpu extra), and reports per-chip
memory and flops.

    scripts/aot_check.py --config configs/ladic_coco.py --topology v5e:4x4
    scripts/aot_check.py --config configs/ladic_coco.py --topology v4:2x2x2,v5p:2x2x1 --json fit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ladic_jax.cli import common

EPILOG = """\
Examples:
  scripts/aot_check.py --config configs/ladic_coco.py --topology v5e:4x4
  scripts/aot_check.py --config configs/ladic_coco.py --topology v4:2x2x2,v5p:2x2x1 --json fit.json
  scripts/aot_check.py --config configs/ladic_coco.py --topology v5e:2x2 --programs sampler \\
      --config.input.eval_batch_size=256 --config.sampler.steps=5

Needs libtpu (the tpu extra: pip install -e '.[tpu]'; scripts/setup_env.sh installs it). Nothing is
downloaded: pretrained parts need their sizes spelled out in the config (configs/ladic_coco.py does)
unless their config.json is on this machine. The paper config takes some minutes per topology here.

Topologies are GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC (v4, v5p), in chips, as libtpu names
them: v5e:2x2 (4 chips), v5e:4x4 (16), v4:2x2x2 (8), v5p:2x2x1 (4), v6e:2x2 (4). v4 and v5p chips
are one device each (megacore), as JAX shows them on a TPU VM.

Each program is compiled with its real shardings (the config's mesh over the topology's chips);
memory is per chip (arguments, outputs, temporaries, generated code; donated buffers counted once)
against what XLA lets one program use on that chip. The sampler row adds the optimizer state when
the config evaluates inside training. Flops are XLA's count per chip (the sampler's denoising loop
counted at its full number of steps), for all chips and per example. A config that splits its
batch over a number of chips that does not divide it is reported as not fitting, with the field.

Exit status: 0 every program fits; 1 something does not fit (the last line says what, where and by
how much); 2 bad arguments, config or topology.

""" + common.OVERRIDE_HELP


def main(argv=None) -> None:
    # The check runs nothing on an accelerator: trace on the CPU, compile for the topology's TPUs.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # it needs shapes only: never download
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Ahead-of-time TPU fit: compile a config's train step and sampler for a TPU topology "
                    "on this machine (no TPU needed) and report per-chip HBM use and flops.")
    common.add_config_flag(p)
    p.add_argument("--topology", required=True, metavar="GEN:SHAPE[,GEN:SHAPE...]",
                   help="TPU slice(s) to compile for, e.g. v5e:4x4 or v4:2x2x2,v5p:2x2x1")
    p.add_argument("--programs", default="train_step,sampler", metavar="NAMES",
                   help="which programs to compile: train_step, sampler or both (default: both)")
    p.add_argument("--json", metavar="FILE", help="also write the reports (bytes, flops, verdicts) as JSON")
    args, overrides = common.parse(p, argv)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        common.fail(f"--json {args.json}: directory {os.path.dirname(os.path.abspath(args.json))} does not exist")
    common.setup_logging()

    from ladic_jax import aot
    from ladic_jax import config as config_lib

    programs = [s.strip() for s in args.programs.split(",") if s.strip()]
    topologies = [s.strip() for s in args.topology.split(",") if s.strip()]
    try:
        cfg = common.load(args.config, overrides)
    except config_lib.ConfigError as e:
        common.fail(str(e))
    reports = []
    for topology in topologies:
        try:
            report = aot.check(cfg, topology, config_name=args.config, programs=programs)
        except (aot.AotError, config_lib.ConfigError) as e:
            common.fail(f"{args.config} on {topology}: {e}")
        except FileNotFoundError as e:
            common.fail(f"{args.config} on {topology}: {e}\nThe check needs only the model's shapes: spell out "
                        "the sizes of pretrained parts beside them in the config (as configs/ladic_coco.py does)")
        print(aot.format_report(report), flush=True)
        print(flush=True)
        reports.append(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=2)
    failed = [r for r in reports if not r.fits]
    for r in failed:
        print(f"error: {aot.verdict(r)}", file=sys.stderr)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
