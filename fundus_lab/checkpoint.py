"""Training checkpoints: written atomically, loaded without unpickling anything.

A checkpoint is a folder ``run_dir/checkpoint-<step>/`` holding

    <model files>              ``model.save_pretrained`` (safetensors + JSON config + tokenizer),
                               so ``fl.load_model(checkpoint_dir)`` works on it directly
    trainer_state.json         step, data position (epoch, batch index), RNG states of every
                               process, scheduler and grad-scaler state, the optimizer's
                               non-tensor state (param groups, hyper-parameters)
    optimizer.safetensors      the optimizer's tensors (Adam moments, step counts)

``run_dir/checkpoint-last`` is a relative symlink to the newest complete checkpoint.

Why this shape: a pickle (``torch.save`` of an optimizer) can run arbitrary code when
loaded, so tensors go to safetensors and everything else to JSON. Why atomic: a job killed
while saving (pre-emption, out of time) must still resume, so a checkpoint is written to a
hidden temp folder, fsynced, renamed into place, and only then does ``checkpoint-last`` move
(``os.replace`` of a symlink is atomic on POSIX). The previous checkpoint stays complete and
reachable until the new one is.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LAST = "checkpoint-last"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, of another format or not matching the model.

    The one error type for weights (``fl.load_model``) and training state alike."""


# ---------------------------------------------------------------------------------------
# nested state <-> (JSON tree, flat tensor dict)


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Split a nested state dict into a JSON-safe tree and a flat ``{key: tensor}`` dict.

    Each tensor is replaced in the tree by ``{"__tensor__": key}``; tuples are tagged so
    they come back as tuples (Adam's ``betas``). Integer dict keys (an optimizer's
    parameter indices) are tagged too, since JSON keys are strings.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state key {k!r} at {prefix or '<root>'} is not a str or int")
            json_key = f"__int__{k}" if isinstance(k, int) else k
            out[json_key] = flatten_state(v, tensors, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix or '<root>'} in a checkpoint without pickle")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {
            (int(k[len("__int__"):]) if k.startswith("__int__") else k): unflatten_state(v, tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------
# RNG states (python, numpy, torch, cuda) as JSON


def rng_state() -> dict:
    """This process's RNG states as JSON-safe values (byte states become int lists)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict, where: str = "trainer_state.json") -> None:
    """Restore what :func:`rng_state` captured; a malformed state is a :class:`CheckpointError`
    naming ``where`` (nothing is restored from a state that does not parse in full)."""
    try:
        version, internal, gauss = state["python"]
        py = (version, tuple(internal), gauss)
        name, keys, pos, has_gauss, cached = state["numpy"]
        nps = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        th = torch.tensor(state["torch"], dtype=torch.uint8)
        old = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.setstate(py)
            np.random.set_state(nps)
            torch.set_rng_state(th)
        except BaseException:
            random.setstate(old[0])
            np.random.set_state(old[1])
            torch.set_rng_state(old[2])
            raise
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{where}: rng state is malformed ({type(err).__name__}: {err})") from None
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"checkpoint holds CUDA RNG states for {len(cuda)} devices, this process sees "
                f"{torch.cuda.device_count()}; exact resume needs the same devices"
            )
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------
# finding checkpoints


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not named checkpoint-<step>")
    return int(match.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def last_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``checkpoint-last`` points to, else the newest complete one, else None."""
    run_dir = Path(run_dir)
    link = run_dir / LAST
    if link.is_dir() and (link / STATE_FILE).is_file():
        return run_dir / os.readlink(link) if link.is_symlink() else link
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------
# atomic writes


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; nothing to flush then
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path`` to disk (children before parents)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is swapped out, then deleted."""
    if dst.exists():
        trash = dst.with_name(f".trash-{dst.name}-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def _point_last(run_dir: Path, target: Path) -> None:
    tmp = run_dir / f".{LAST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)  # relative: the run folder can be moved or copied
    os.replace(tmp, run_dir / LAST)
    _fsync_path(run_dir)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a :class:`CheckpointError` naming the file for a
    truncated or corrupt file (a disk that filled up mid-save), instead of a raw SafetensorError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError, ValueError alike
        raise CheckpointError(
            f"{path}: cannot be read as safetensors ({type(err).__name__}: {err}); the file is truncated "
            "or corrupt (was the disk full?); resume from an earlier checkpoint"
        ) from None


TMP_PATTERNS = (".tmp-checkpoint-*", ".trash-checkpoint-*", f".{LAST}.tmp-*")


def clean_tmp(run_dir: str | Path) -> list[Path]:
    """Remove what a job killed mid-save leaves behind (``.tmp-checkpoint-*`` folders, swapped-out
    ``.trash-*`` folders, half-made ``checkpoint-last`` links). Call with the run folder locked."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for pattern in TMP_PATTERNS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_finite_weights(module: torch.nn.Module, where: str = "") -> None:
    """Raise ``FloatingPointError`` naming the parameters that hold NaN/Inf: such weights are
    never written as a checkpoint (``checkpoint-last`` must stay a state worth resuming)."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise FloatingPointError(
            f"{where}: refusing to save non-finite weights in {len(bad)} parameter(s) ({', '.join(bad[:5])})"
        )


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


def read_json_file(path: Path, missing_hint: str = "") -> dict:
    """A checkpoint's JSON file as a dict; a missing, unparsable or non-mapping file is a
    :class:`CheckpointError` naming the file (``missing_hint`` says what to check)."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is not a complete checkpoint: {path.name} is missing{missing_hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, whether raised as an OSError or inside safetensors' own SafetensorError
    (which carries the OS error only in its message)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return type(err).__name__ == "SafetensorError" and any(
        s in text for s in ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC}"))


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free} bytes are free in {folder}"
    except OSError:
        return f"the free space in {folder} is unknown"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
    keep: Optional[int] = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically, move ``checkpoint-last`` to it, prune.

    Args:
        save_model: writes the model into the folder it is given (``model.save_pretrained``).
        optimizer: its ``state_dict()`` is split into safetensors + JSON (no pickle).
        trainer_state: JSON-safe (or :func:`flatten_state`-able) dict: step, data position,
            RNG, scheduler state, ...; tensors in it go to ``optimizer.safetensors`` too.
        keep: keep only the newest ``keep`` checkpoints (None or <= 0 keeps all).

    Returns the final checkpoint folder. Call on the main process only. A full disk while
    writing is a :class:`CheckpointError` saying so; the temp folder is removed and the
    previous checkpoint is left as it was.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash
    tmp.mkdir()

    try:
        save_model(tmp)
        tensors: dict[str, torch.Tensor] = {}
        state = {"format_version": FORMAT_VERSION, "step": int(step)}
        if optimizer is not None:
            state["optimizer"] = flatten_state(optimizer.state_dict(), tensors, "optimizer")
        state["trainer"] = flatten_state(trainer_state or {}, tensors, "trainer")
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        # the state file last: a folder without it is never taken for a checkpoint
        write_json(tmp / STATE_FILE, state)
        fsync_tree(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder would only fill the disk further
        if _disk_full(err):
            raise CheckpointError(
                f"{final}: cannot save the checkpoint, the disk is full ({type(err).__name__}: {err}); "
                f"{_free_space(run_dir)}; the previous checkpoint ({LAST}) is intact: free space and resume "
                "from it") from None
        raise

    replace_dir(tmp, final)
    _fsync_path(run_dir)
    _point_last(run_dir, final)
    if keep and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old.resolve() != final.resolve():
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Read a checkpoint's training state (never unpickles) and restore ``optimizer`` from it.

    Returns ``{"step": int, "trainer": dict}``. The model itself is loaded by the caller
    (``fl.load_model(path)`` or ``load_state_dict`` from the safetensors it wrote).
    """
    path = Path(path)
    state_path = path / STATE_FILE
    state = read_json_file(state_path)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: format_version {state.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{state_path}: field 'step' is {step!r}; expected an integer >= 0")
    tensor_path = path / OPTIMIZER_FILE
    tensors = read_safetensors(tensor_path) if tensor_path.is_file() else {}
    try:
        opt_state = unflatten_state(state["optimizer"], tensors) if "optimizer" in state else None
        trainer = unflatten_state(state.get("trainer", {}), tensors)
    except KeyError as err:
        raise CheckpointError(f"{state_path}: names tensor {err} which {tensor_path} does not hold (a mixed-up "
                              "or partly copied checkpoint)") from None
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{state_path}: field 'trainer' is {type(trainer).__name__}; expected a mapping")
    if optimizer is not None:
        if opt_state is None:
            raise CheckpointError(f"{state_path}: holds no optimizer state to resume from")
        check_optimizer_state(opt_state, optimizer, state_path)
        try:
            optimizer.load_state_dict(opt_state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{state_path}: optimizer state does not fit this optimizer ({err})") from None
    return {"step": step, "trainer": trainer}


def check_optimizer_state(opt_state: Any, optimizer: torch.optim.Optimizer, where: Path) -> None:
    """Compare every saved per-parameter tensor (Adam moments) with its parameter's shape now,
    so a mismatch is found at load, naming the parameter, not at the first step."""
    if not isinstance(opt_state, dict) or not isinstance(opt_state.get("state"), dict) or not isinstance(opt_state.get("param_groups"), list):
        raise CheckpointError(f"{where}: optimizer state is malformed (expected 'state' and 'param_groups')")
    saved_groups = opt_state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{where}: optimizer has {len(saved_groups)} parameter group(s) saved, {len(optimizer.param_groups)} now "
            "(a different model or method)"
        )
    index = 0
    for gi, (saved, now) in enumerate(zip(saved_groups, optimizer.param_groups)):
        ids = saved.get("params", []) if isinstance(saved, dict) else []
        if len(ids) != len(now["params"]):
            raise CheckpointError(
                f"{where}: optimizer group {gi} has {len(ids)} parameters saved, {len(now['params'])} now"
            )
        for pid, param in zip(ids, now["params"]):
            for key, value in (opt_state["state"].get(pid) or {}).items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                    raise CheckpointError(
                        f"{where}: optimizer state {key!r} of group {gi} parameter {index} has shape "
                        f"{list(value.shape)}, the parameter is {list(param.shape)}"
                    )
            index += 1
