"""Reading saved model folders without running code from them.

A ``model.pt`` written by :meth:`~cellplm_scvi.CellPLM.save` is a torch zip file whose pickle holds
tensors, numbers, strings, containers, numpy arrays and pandas frames (the registry and the
training history). Unpickling anything else can call arbitrary functions, so :func:`read_model_file`
reads the pickle with an unpickler that resolves only the globals such a file refers to, and
refuses every other one before it is called.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from pathlib import Path

import torch


class ModelFileError(ValueError):
    """A saved model file is damaged, is not a model, or would need code to run to be read."""


class UnsafeGlobalError(pickle.UnpicklingError):
    """The pickle refers to a global that a saved CellPLM model never holds."""


#: ``(module, name)`` of every global a file written by ``CellPLM.save`` refers to, plus the
#: close relatives that other versions of numpy, pandas and torch write for the same objects.
_ALLOWED_GLOBALS = frozenset(
    [("builtins", name) for name in ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset")]
    + [("builtins", name) for name in ("int", "list", "range", "set", "slice", "str", "tuple")]
    + [("_codecs", "encode"), ("collections", "OrderedDict"), ("collections", "defaultdict")]
    + [("numpy", "dtype"), ("numpy", "ndarray")]
    + [
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    ]
    + [
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
    ]
    + [("torch._utils", name) for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_tensor")]
    + [("torch", "Size"), ("torch", "device")]
)
#: Modules whose every public name is a dtype class or a tensor storage class.
_ALLOWED_MODULES = ("numpy.dtypes",)


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    if module in _ALLOWED_MODULES and name.endswith("DType"):
        return True
    # torch.FloatStorage, torch.float32, ...: storage classes and dtypes, which hold no code.
    return module == "torch" and (
        name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only the globals of a saved CellPLM model."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles name it so
        if not _is_allowed(module, name):
            raise UnsafeGlobalError(f"{module}.{name}")
        return super().find_class(module, name)


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


#: Passed to :func:`torch.load` as ``pickle_module``: torch builds its unpickler on ours.
_restricted_pickle = types.ModuleType("cellplm_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load
_restricted_pickle.__version__ = "1"


def read_model_file(path: str | Path, map_location: str | torch.device | None = None) -> dict:
    """Read a ``model.pt`` written by ``CellPLM.save`` without running code from it.

    Parameters
    ----------
    path
        The file.
    map_location
        Where to put the tensors (as in :func:`torch.load`).

    Returns
    -------
    The saved dictionary (``model_state_dict``, ``var_names``, ``attr_dict``).

    Raises
    ------
    ModelFileError
        When the file is missing, damaged or not a saved model, or when reading it would resolve a
        global that a saved model never holds (a pickle that could run code); nothing from the
        file is called in that case.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist; save a model there with model.save(...).")
    try:
        saved = torch.load(
            path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle
        )
    except UnsafeGlobalError as err:
        raise ModelFileError(
            f"{path} was refused: reading it would call {err}, which a model saved by CellPLM.save "
            "never holds and which could run code on this machine. Only load model files you or "
            "cellplm-scvi wrote; re-save the model from a trusted copy with model.save(...)."
        ) from None
    except PermissionError as err:
        raise ModelFileError(f"{path} cannot be read: {err.strerror}.") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        RuntimeError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
    ) as err:
        raise ModelFileError(_damaged(path, err)) from None
    if not (
        isinstance(saved, dict)
        and {"model_state_dict", "attr_dict"} <= saved.keys()
        and "registry_" in saved["attr_dict"]
    ):
        raise ModelFileError(_damaged(path, "it holds no model_state_dict, attr_dict and registry"))
    return saved


def _damaged(path: Path, reason) -> str:
    return (
        f"{path} is damaged or is not a saved CellPLM model ({reason}). Re-save the model with "
        "model.save(...) and load that folder."
    )
