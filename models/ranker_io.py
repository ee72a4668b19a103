"""Rankers as data: named numpy arrays plus a JSON header, never pickles.

A ranker snapshot must be loadable without running code from the file (the snapshot
store is writable by whoever can write the directory; a sha256 manifest beside the
file only detects corruption). So a ``Ranker`` is written as what it *is*: the
arguments ``make_ranker`` built it from (JSON) and its learned state as arrays, and is
read back by calling ``make_ranker`` again and filling the state in. The file is an
uncompressed ``.npz`` read with ``allow_pickle=False``: strings are packed UTF-8
bytes (``state.packing``), numbers are numeric arrays, the header is a JSON string.

State written per kind (everything the model's predictions and further learning use):

* ``lr`` (River ``LogisticRegression``): weights (feature names, values, in their
  order), intercept, the Adagrad sums and the optimizer's step count;
* ``fm`` (River ``FMClassifier``): weights, latent vectors, intercept, both
  optimizers' step counts and the latent initializer's random state (River draws a
  latent for every unseen feature, at learning *and* prediction time, so the state
  decides future scores);
* ``efm`` (``EmbeddingFM``): its embedding table (``EmbeddingTable.snapshot`` arrays),
  bias, Adagrad sum of the bias, clocks and counters.

Positives held back (``hold_positives_ms``) are not written: a serving copy holds none.
Feature names must be strings (they are: ``models.features``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from river import linear_model, utils

from models.embedding_fm import EmbeddingFM
from models.rankers import Ranker, make_ranker
from state.embedding_table import EmbeddingTable
from state.npz import save_npz
from state.packing import pack_strings, unpack_strings

FORMAT = 1
"""Version of the layout below; files of another version are refused."""

_TABLE = "table_"


def _names(arrays: dict[str, np.ndarray], prefix: str, names: list[Any]) -> None:
    if not all(type(n) is str for n in names):
        raise ValueError("ranker feature names must be strings to be saved as data")
    arrays[f"{prefix}_blob"], arrays[f"{prefix}_offsets"] = pack_strings(names)


def _unnames(z: dict[str, np.ndarray], prefix: str) -> list[str]:
    return unpack_strings(z[f"{prefix}_blob"], z[f"{prefix}_offsets"])


def _float_dict(arrays: dict[str, np.ndarray], prefix: str, d: Any) -> None:
    _names(arrays, prefix, list(d))
    arrays[f"{prefix}_values"] = np.fromiter((float(v) for v in d.values()), np.float64, len(d))


def _float_items(z: dict[str, np.ndarray], prefix: str) -> list[tuple[str, float]]:
    names = _unnames(z, prefix)
    values = np.asarray(z[f"{prefix}_values"], np.float64).tolist()
    if len(names) != len(values):
        raise ValueError(f"ranker snapshot: {prefix} names and values differ in length")
    return list(zip(names, values, strict=True))


def ranker_arrays(ranker: Ranker, frozen: bool | None = None) -> dict[str, np.ndarray]:
    """The ranker as named arrays (header JSON in ``header``); ``frozen`` overrides the
    ranker's own flag (True: the file loads as a serving copy)."""
    model = ranker.model
    header: dict[str, Any] = {
        "format": FORMAT, "kind": ranker.kind, "params": ranker.params,
        "negative_rate": ranker.negative_rate, "batch_size": ranker.batch_size,
        "hold_positives_ms": ranker.hold_positives_ms, "max_features": ranker.max_features,
        "rate": ranker.rate, "frozen": ranker.frozen if frozen is None else frozen, "n_learned": ranker.n_learned,
        "last_ts_ms": ranker.last_ts_ms, "pruned": ranker.pruned,
    }
    arrays: dict[str, np.ndarray] = {}
    if ranker.kind == "lr":
        _float_dict(arrays, "w", model._weights)
        _float_dict(arrays, "g2", getattr(model.optimizer, "g2", {}))
        header["intercept"] = float(model.intercept)
        header["n_iterations"] = int(model.optimizer.n_iterations)
        if model.l1 != 0:
            _float_dict(arrays, "cum_l1", model.cum_l1)
            header["max_cum_l1"] = float(model.max_cum_l1)
    elif ranker.kind == "fm":
        _float_dict(arrays, "w", model.weights)
        _names(arrays, "latent", list(model.latents))
        arrays["latent_values"] = (np.stack([np.asarray(v, np.float64) for v in model.latents.values()])
                                   if model.latents else np.zeros((0, model.n_factors)))
        header["intercept"] = float(model.intercept)
        header["n_iterations"] = [int(model.weight_optimizer.n_iterations),
                                  int(model.latent_optimizer.n_iterations)]
        name, keys, pos, has_gauss, gauss = model.latent_initializer._rng.get_state()
        arrays["rng_keys"] = np.asarray(keys, np.uint32)
        header["rng"] = [str(name), int(pos), int(has_gauss), float(gauss)]
    else:
        arrays.update({f"{_TABLE}{k}": np.asarray(v) for k, v in model.table.snapshot().items()})
        header.update(bias=float(model.bias), bias_acc=float(model._bias_acc),
                      now_ms=int(model.now_ms), last_expire_ms=model._last_expire_ms,
                      model_n_learned=int(model.n_learned))
    arrays["header"] = np.asarray(orjson.dumps(header).decode())
    return arrays


def ranker_from_arrays(z: dict[str, np.ndarray]) -> Ranker:
    """Rebuild a ranker from :func:`ranker_arrays` output (ValueError when malformed)."""
    try:
        header = orjson.loads(str(z["header"]))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"unsupported ranker snapshot format {header.get('format')!r}")
        params = header["params"]
        if not isinstance(params, dict):
            raise ValueError("ranker snapshot: params must be an object")
        ranker = make_ranker(header["kind"], negative_rate=header["negative_rate"],
                             batch_size=header["batch_size"],
                             hold_positives_ms=header["hold_positives_ms"],
                             max_features=header["max_features"], **params)
        model = ranker.model
        if ranker.kind == "lr":
            _restore_lr(model, z, header)
        elif ranker.kind == "fm":
            _restore_fm(model, z, header)
        else:
            _restore_efm(model, z, header)
        ranker.rate = float(header["rate"])
        ranker.frozen = bool(header["frozen"])
        ranker.n_learned = int(header["n_learned"])
        ranker.last_ts_ms = _int_or_none(header["last_ts_ms"])
        ranker.pruned = int(header["pruned"])
    except ValueError:
        raise
    except Exception as err:  # KeyError, TypeError, orjson errors: a malformed file
        raise ValueError(f"malformed ranker snapshot: {type(err).__name__}: {err}") from None
    return ranker


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _restore_lr(model: linear_model.LogisticRegression, z: dict[str, np.ndarray],
                header: dict[str, Any]) -> None:
    weights = utils.VectorDict(None)
    for name, value in _float_items(z, "w"):
        weights[name] = value
    model._weights = weights
    model.intercept = float(header["intercept"])
    model.optimizer.g2.update(_float_items(z, "g2"))
    model.optimizer.n_iterations = int(header["n_iterations"])
    if "cum_l1_blob" in z:
        for name, value in _float_items(z, "cum_l1"):
            model.cum_l1[name] = value
        model.max_cum_l1 = float(header["max_cum_l1"])


def _restore_fm(model: Any, z: dict[str, np.ndarray], header: dict[str, Any]) -> None:
    model.weights.update(_float_items(z, "w"))
    names = _unnames(z, "latent")
    latents = np.asarray(z["latent_values"], np.float64)
    if latents.shape != (len(names), model.n_factors):
        raise ValueError("ranker snapshot: latent matrix does not match its names")
    for n, name in enumerate(names):
        model.latents[name] = latents[n].copy()
    model.intercept = float(header["intercept"])
    model.weight_optimizer.n_iterations, model.latent_optimizer.n_iterations = (
        int(i) for i in header["n_iterations"])
    name, pos, has_gauss, gauss = header["rng"]
    keys = np.asarray(z["rng_keys"], np.uint32)
    model.latent_initializer._rng.set_state((str(name), keys, int(pos), int(has_gauss),
                                             float(gauss)))


def _restore_efm(model: EmbeddingFM, z: dict[str, np.ndarray], header: dict[str, Any]) -> None:
    table = EmbeddingTable.restore({k[len(_TABLE):]: v for k, v in z.items()
                                    if k.startswith(_TABLE)}, copy=True)
    if table.dim != model.k + 1:
        raise ValueError("ranker snapshot: embedding table width does not match k")
    model.table = table
    model.bias = float(header["bias"])
    model._bias_acc = float(header["bias_acc"])
    model.now_ms = int(header["now_ms"])
    model._last_expire_ms = _int_or_none(header["last_expire_ms"])
    model.n_learned = int(header["model_n_learned"])


def save_ranker(ranker: Ranker, path: str | os.PathLike, frozen: bool | None = None) -> None:
    """Write ``ranker`` to ``path`` exactly, as one uncompressed ``.npz`` (no pickles);
    ``frozen=True`` writes it as a serving copy (loads refusing to learn)."""
    save_npz(path, ranker_arrays(ranker, frozen))


def load_ranker_file(path: str | os.PathLike | Path) -> Ranker:
    """Read a file written by :func:`save_ranker`; never unpickles (``allow_pickle=False``):
    anything else (a pickle, a damaged file) raises ``ValueError``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError(f"{Path(path).name} is not a ranker snapshot (.npz)")
            arrays = {k: z[k] for k in z.files}
    except ValueError as err:  # incl. "Cannot load file containing pickled data"
        raise ValueError(f"{Path(path).name} refused: {err}") from None
    except Exception as err:  # BadZipFile, EOFError, OSError on a damaged archive
        raise ValueError(f"{Path(path).name} refused: {type(err).__name__}: {err}") from None
    return ranker_from_arrays(arrays)
