"""Helper run in a subprocess (the device count is fixed at JAX start-up): trains the tiny LaDiC config
for a few steps under each mesh given on the command line and prints the losses as JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_losses.py DATA_DIR WORKDIR 8,1,1 4,2,1
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_setup import make_tiny_config  # noqa: E402
from ladic_jax import trainer  # noqa: E402


def main():
    data_dir, workdir, meshes = sys.argv[1], sys.argv[2], sys.argv[3:]
    out = {}
    for spec in meshes:
        d, f, m = (int(x) for x in spec.split(","))
        cfg = make_tiny_config(data_dir, ["total_steps=3", "log_every=1", "input.batch_size=8"])
        with cfg.unlocked():
            cfg.mesh = [("data", d), ("fsdp", f), ("model", m)]
            cfg.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
        wd = os.path.join(workdir, spec.replace(",", "x"))
        trainer.train_and_evaluate(cfg, wd)
        with open(os.path.join(wd, "metrics.jsonl")) as fh:
            out[spec] = [json.loads(l)["train/loss"] for l in fh if "train/loss" in l]
    print("LOSSES " + json.dumps(out))


if __name__ == "__main__":
    main()
