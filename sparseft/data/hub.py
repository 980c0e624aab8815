"""Data from the Hugging Face hub: `data.train: {hub: org/name, split: train, subset: ..., revision: ...}`.

The dataset is read with `datasets.load_dataset` (which downloads it once and serves it from its cache after), or with
`datasets.load_from_disk` when `hub` names a directory that `save_to_disk` wrote. Its rows then go through the same
forms, field renames and row checks as a local file's; a row's number is its 1-based index in the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseft.errors import UserError


def check_source(cfg: Any) -> None:
    """A data entry names one source: a local `path`, or a `hub` dataset with its split, subset and revision."""
    if (cfg.path is None) == (cfg.hub is None):
        raise ValueError("give either path (a local file) or hub (a dataset id such as tatsu-lab/alpaca), not "
                         + ("both" if cfg.path is not None else "neither"))
    if cfg.path is not None:
        extra = [k for k in ("subset", "revision") if getattr(cfg, k) is not None]
        extra += ["split"] if cfg.split != "train" else []
        if extra:
            raise ValueError(f"{', '.join(extra)}: only used with hub (a local file is read whole)")


def describe(cfg: Any, key: str) -> str:
    """How messages name a data entry: `data.train.path=x.jsonl` or `data.train.hub=org/name[split]`."""
    if cfg.hub is None:
        return f"{key}.path={cfg.path}"
    subset = f"/{cfg.subset}" if cfg.subset else ""
    revision = f"@{cfg.revision}" if cfg.revision else ""
    return f"{key}.hub={cfg.hub}{subset}{revision}[{cfg.split}]"


def read_source_rows(cfg: Any, key: str) -> list[tuple[int, dict]]:
    """The numbered rows of a recipe's data entry (`key` is e.g. data.train), from a local file or the hub."""
    from sparseft.data.files import read_numbered_rows

    if cfg.hub is None:
        return read_numbered_rows(cfg.path, f"{key}.path")
    return read_hub_rows(cfg.hub, cfg.split, cfg.subset, cfg.revision, describe(cfg, key))


def read_hub_rows(name: str, split: str, subset: str | None, revision: str | None,
                  where: str) -> list[tuple[int, dict]]:
    from sparseft.data.files import quiet_datasets

    with quiet_datasets():
        if (Path(name) / "dataset_dict.json").is_file() or (Path(name) / "state.json").is_file():
            ds = _from_disk(name, split, where)
        else:
            ds = _load(name, split, subset, revision, where)
    rows = list(enumerate(ds.to_list(), start=1))
    if not rows:
        raise UserError(f"{where}: the split has no rows")
    return rows


def _from_disk(name: str, split: str, where: str):
    import datasets

    ds = datasets.load_from_disk(name)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{where}: no split {split!r} (the dataset has {', '.join(ds)}); set split")
        ds = ds[split]
    return ds


def _load(name: str, split: str, subset: str | None, revision: str | None, where: str):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as e:
        raise UserError(f"{where}: {_reason(e, name)}") from None


def _reason(e: Exception, name: str) -> str:
    """What went wrong, in words a user can act on (datasets' own messages run to many lines)."""
    import datasets

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if datasets.config.HF_HUB_OFFLINE and not Path(name).exists():
        return ("not in the local datasets cache, and HF_HUB_OFFLINE is set so it cannot be downloaded; run once "
                f"online (without HF_HUB_OFFLINE) to cache it, or give a local path ({text})")
    if isinstance(e, ValueError) and "split" in text.lower():
        return f"{text}; set split"
    if "config" in text.lower() and ("missing" in text.lower() or "not found" in text.lower()):
        return f"{text}; set subset"
    return f"could not load: {text}"
