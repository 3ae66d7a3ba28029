"""The project's own TFDS datasets: registering them by name, and building one.

    shapes_captions     synthetic, generated (configs default, long, tiny)
    karpathy_captions   COCO / Flickr8k / Flickr30k / Flickr30k+8k in Karpathy's splits, from local files
    cub_captions        CUB-200-2011 with ten captions per image, from local files

Any other name is left to TFDS (`coco_captions/2014`, ...). `register(name)` imports the module that defines
a project dataset, which registers its builder with TFDS; the input pipeline, `ladic-data show` and
`ladic-data build` all go through it.
"""

from __future__ import annotations

import dataclasses
import importlib
import time

# Dataset name -> the module whose import registers its builder.
PROJECT_BUILDERS = {
    "shapes_captions": "ladic_jax.data.shapes_captions",
    "karpathy_captions": "ladic_jax.data.karpathy_captions",
    "cub_captions": "ladic_jax.data.cub_captions",
}
# The datasets read from files the user provides (`--manual_dir`); the others are generated.
MANUAL = ("karpathy_captions", "cub_captions")


KARPATHY_SETS = ("coco", "flickr8k", "flickr30k", "flickr30k+8k")


def karpathy_input(data: str) -> dict[str, str]:
    """A paper config's `data=` choice as `input.dataset` and `input.train_split`.

    `coco`, `flickr8k`, `flickr30k`, `flickr30k+8k`: Karpathy's splits built by this project from the files
    a researcher has (`karpathy_captions/<data>`, built offline from local or gs:// files, every reference
    kept); COCO trains on train+restval (113,287 images), the others on train. `coco_captions`: TFDS's own
    `coco_captions/2014` (the same Karpathy splits, but `tfds build` downloads ~20 GB from the COCO site).
    """
    if data == "coco_captions":
        return {"dataset": "coco_captions/2014", "train_split": "train+restval"}
    if data not in KARPATHY_SETS:
        raise ValueError(f"data={data!r}: choose one of {KARPATHY_SETS + ('coco_captions',)}")
    return {"dataset": f"karpathy_captions/{data}", "train_split": "train+restval" if data == "coco" else "train"}


# Split sizes of the real datasets as their sources give them (images), for estimates made without the data
# (the AOT report's training and captioning times).
KNOWN_SPLIT_SIZES = {
    "karpathy_captions/coco": {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000},
    "coco_captions/2014": {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000},
    "karpathy_captions/flickr8k": {"train": 6_000, "val": 1_000, "test": 1_000},
    "karpathy_captions/flickr30k": {"train": 29_000, "val": 1_014, "test": 1_000},
    "cub_captions/default": {"train": 5_994, "test": 5_794},
    "cub_captions/unseen_classes": {"train": 8_855, "test": 2_933},
}


def known_size(dataset: str, split: str) -> int | None:
    """Images of a split spec ("train+restval") of a dataset in KNOWN_SPLIT_SIZES, or None."""
    sizes = KNOWN_SPLIT_SIZES.get(dataset)
    if sizes is None or any(part not in sizes for part in split.split("+")):
        return None
    return sum(sizes[part] for part in split.split("+"))


def base_name(dataset: str) -> str:
    """"karpathy_captions/coco:1.0.0" -> "karpathy_captions"."""
    return dataset.split("/")[0].split(":")[0]


def register(dataset: str):
    """Imports the module of a project dataset (registering it with TFDS); returns it, or None for others."""
    module = PROJECT_BUILDERS.get(base_name(dataset))
    return None if module is None else importlib.import_module(module)


def config_names(dataset: str) -> list[str]:
    """The builder configs of a project dataset."""
    return [c.name for c in register(dataset).CONFIGS]


def build_hint(dataset: str) -> str:
    """The command that prepares `dataset` ("name" or "name/config")."""
    base, _, config = dataset.partition("/")
    config = config.split(":")[0]
    if base_name(dataset) not in PROJECT_BUILDERS:
        return f"`tfds build {dataset} --data_dir DATA_DIR`"
    manual = " --manual_dir DIR" if base_name(dataset) in MANUAL else ""
    return f"`ladic-data build {base}{f' --config {config}' if config else ''}{manual} --data_dir DATA_DIR`"


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What `build` did: where the data is, how much of it, and how long it took."""

    path: str
    config: str
    split_sizes: dict[str, int]
    seconds: float
    reused: bool  # True if the data was already there and nothing was generated.


def build(dataset: str, data_dir: str, config=None, manual_dir: str | None = None) -> BuildReport:
    """Builds project dataset `dataset` with `config` (a name or a BuilderConfig; None: the default) into
    `data_dir`, unless it is already there. The real datasets read their files from `manual_dir`."""
    import tensorflow_datasets as tfds

    module = register(dataset)
    if module is None:
        raise ValueError(f"{dataset!r} is not built by this project; choose one of {sorted(PROJECT_BUILDERS)} "
                         f"(TFDS's own datasets: `tfds build NAME`)")
    names = config_names(dataset)
    if isinstance(config, str) and config not in names:
        raise ValueError(f"unknown {dataset} config {config!r}; choose one of {names}")
    if (manual_dir is None) == (dataset in MANUAL):
        raise ValueError(f"{dataset} reads the dataset's files from --manual_dir DIR" if dataset in MANUAL
                         else f"{dataset} is generated: it takes no --manual_dir")
    start = time.perf_counter()
    builder = tfds.builder_cls(dataset)(data_dir=data_dir, config=config)
    reused = builder.is_prepared()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return BuildReport(path=str(builder.data_dir), config=builder.builder_config.name,
                       split_sizes={k: v.num_examples for k, v in builder.info.splits.items()},
                       seconds=time.perf_counter() - start, reused=reused)
