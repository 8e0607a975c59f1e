"""One patch as one PEFT LoRA adapter directory, exactly, plus the `star.json` sidecar.

Encoding (per patched layer, whichever is smaller; both are exact and vanilla `peft` loads both):

* one-hot:  r = k (number of patched neurons), lora_A (k, d_ff) one-hot rows selecting the neurons
            (stored as float16: 0 and 1 are exact, and A is most of the file), lora_B (d, k) = the
            delta columns (float32);
* identity: r = d, lora_B = I_d, lora_A (d, d_ff) = the dense delta (untouched columns zero).

`lora_alpha = r` per module through `rank_pattern` / `alpha_pattern`, so PEFT's scale is exactly 1 and the
applied delta is B @ A. Reading never unpickles: only safetensors, parsed and checked before any tensor
is built, and nothing touches the model until every check passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import cattrs
import numpy as np
import torch
from cattrs.cols import is_sequence, list_structure_factory
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..case import RepairCase
from ..model import LoadedModel
from ..patch import LayerDelta, Patch, SavedColumns

FORMAT = "star-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
META_NAME = "star.json"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, META_NAME)
MAX_BYTES = 512 * 2**20            # default size limit of one adapter's weights (configurable)
MAX_JSON_BYTES = 4 * 2**20
MAX_HEADER_BYTES = 16 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message is one line saying why."""


@dataclass
class Adapter:
    """A validated adapter, read into memory; `patch` holds the exact column deltas B @ A."""

    id: str
    path: Path
    meta: dict
    config: dict
    patch: Patch
    size_bytes: int
    weights_sha256: str
    encoding: dict[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.id)

    @property
    def method(self) -> str:
        return str(self.meta.get("method") or "?")

    @property
    def created(self) -> str:
        return str(self.meta.get("created") or "")

    @property
    def cases(self) -> list[RepairCase]:
        return meta_cases(self.meta)


def meta_cases(meta: dict) -> list[RepairCase]:
    out = []
    for c in meta.get("cases") or []:
        if isinstance(c, dict) and isinstance(c.get("prompt"), str) and isinstance(c.get("fix"), str):
            wrong = c.get("wrong")
            out.append(RepairCase(prompt=c["prompt"], fix=c["fix"], wrong=wrong if isinstance(wrong, str) else None))
    return out


# -- fingerprint -------------------------------------------------------------------------------------------


def layer_digest(columns: torch.Tensor) -> str:
    """sha256 of an output-projection weight in the (d, d_ff) layout, as float32 row-major bytes."""
    w = columns.detach().to(torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


def architecture(lm: LoadedModel) -> dict:
    arch = lm.arch
    return {
        "model_type": str(getattr(lm.model.config, "model_type", "?")),
        "class": type(lm.model).__name__,
        "n_layers": arch.n_layers,
        "d_model": arch.d_model,
        "d_ff": arch.d_ff,
        "out_proj": arch.out_proj_name(0).replace(".0.", ".{layer}.", 1),
    }


def current_digest(lm: LoadedModel):
    """Digests of the model's weights as they are now (right for a model with no patch applied)."""
    return lambda layer: layer_digest(lm.arch.columns(layer))


def _base_digest_from_saved(lm: LoadedModel, saved: SavedColumns | None):
    """Digests of the weights a patch was made on: the current weights with its saved columns put back."""

    def digest(layer: int) -> str:
        w = lm.arch.columns(layer)
        if saved is not None and layer in saved.columns:
            idx, values = saved.columns[layer]
            w = w.detach().clone()
            w[:, idx] = values.to(w.dtype)
        return layer_digest(w)

    return digest


# -- encoding ----------------------------------------------------------------------------------------------


def _keys(lm: LoadedModel, layer: int) -> tuple[str, str]:
    module = lm.arch.out_proj_name(layer)
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def encode_patch(lm: LoadedModel, patch: Patch) -> tuple[dict[str, torch.Tensor], dict[int, int], dict[int, str]]:
    """The LoRA tensors for a patch: {key: tensor}, rank per layer, encoding per layer."""
    d, d_ff = lm.arch.d_model, lm.arch.d_ff
    tensors, ranks, encodings = {}, {}, {}
    for layer in patch.layer_ids:
        ld = patch.layers[layer]
        cols = ld.columns.to(torch.long)
        delta = ld.delta.detach().to(torch.float32)
        k = len(cols)
        if k <= d:
            a = torch.zeros(k, d_ff, dtype=torch.float16)
            a[torch.arange(k), cols] = 1.0
            b = delta.clone()
            ranks[layer], encodings[layer] = k, "one-hot"
        else:
            a = torch.zeros(d, d_ff)
            a[:, cols] = delta
            b = torch.eye(d)
            ranks[layer], encodings[layer] = d, "identity"
        key_a, key_b = _keys(lm, layer)
        tensors[key_a], tensors[key_b] = a.contiguous(), b.contiguous()
    return tensors, ranks, encodings


def peft_config(lm: LoadedModel, ranks: dict[int, int]) -> dict:
    """A minimal adapter_config.json that old and new PEFT versions load, with scale alpha / r = 1."""
    modules = [lm.arch.out_proj_name(l) for l in sorted(ranks)]
    per_module = {lm.arch.out_proj_name(l): r for l, r in sorted(ranks.items())}
    first = per_module[modules[0]]
    path = Path(lm.path)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(path.resolve()) if (path / "config.json").is_file() else lm.name,
        "r": first,
        "lora_alpha": first,
        "rank_pattern": per_module,
        "alpha_pattern": dict(per_module),
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(lm.arch.spec.conv1d),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(text: str, n: int = 24) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n].strip("-") or "patch"


@dataclass
class Encoded:
    """An adapter's files, ready to be written."""

    files: dict[str, bytes]
    weights_sha256: str
    meta: dict

    def default_id(self) -> str:
        fix = (self.meta.get("cases") or [{}])[0].get("fix", "")
        return f"{self.weights_sha256[:10]}-{_slug(str(self.meta.get('name') or fix))}"


def encode_adapter(
    lm: LoadedModel,
    patch: Patch,
    *,
    cases: list[dict],
    method: str,
    config: dict,
    metrics: dict,
    base_digest,
    name: str | None = None,
) -> Encoded:
    if not patch.layers:
        raise AdapterError("the patch is empty: nothing to save")
    tensors, ranks, encodings = encode_patch(lm, patch)
    weights = st_save(tensors, metadata={"format": "pt"})
    sha = hashlib.sha256(weights).hexdigest()
    fix = cases[0]["fix"] if cases else ""
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name or fix.strip().split("\n")[0][:80],
        "created": _now(),
        "base_model": {
            "name": lm.name,
            **architecture(lm),
            "weights_sha256": {str(l): base_digest(l) for l in patch.layer_ids},
        },
        "method": method,
        "config": config,
        "cases": cases,
        "layers": patch.layer_ids,
        "neurons": {str(l): len(patch.layers[l].columns) for l in patch.layer_ids},
        "n_neurons": patch.n_neurons,
        "encoding": {str(l): encodings[l] for l in patch.layer_ids},
        "metrics": metrics,
        "adapter_sha256": sha,
    }
    files = {
        WEIGHTS_NAME: weights,
        CONFIG_NAME: (json.dumps(peft_config(lm, ranks), indent=2) + "\n").encode(),
        META_NAME: (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode(),
    }
    return Encoded(files, sha, meta)


def encode_result(lm: LoadedModel, result, *, name: str | None = None, base_digest=None) -> Encoded:
    """Encode a fixed RepairResult. `base_digest(layer)` fingerprints the weights the patch applies to;
    by default the weights as they were before the repair (the current ones with result.saved put back)."""
    if not getattr(result, "fixed", False) or result.patch is None:
        raise AdapterError("only a repair that fixed its case(s) can be saved")
    cases = [{"prompt": c.prompt, "wrong": c.before, "fix": c.fix} for c in result.cases]
    metrics = {
        "seconds": round(float(result.seconds), 3),
        "reason": result.reason,
        "cases": [{"em_before": c.em_before, "em_after": c.em_after, "after": c.after} for c in result.cases],
    }
    return encode_adapter(
        lm,
        result.patch,
        cases=cases,
        method=result.method,
        config=dict(result.config),
        metrics=metrics,
        base_digest=base_digest or _base_digest_from_saved(lm, result.saved),
        name=name,
    )


def all_finite(t: torch.Tensor) -> bool:
    # numpy: single-threaded and ~50x faster than torch.isfinite(...).all() on a busy 2-core machine.
    return bool(np.isfinite(t.detach().to(torch.float32).numpy()).all())


def decode_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column form (ascending neuron indices, (d, k) deltas) of B @ A, the delta PEFT applies at scale 1.
    Our own two encodings are read without the product (same values: B @ A is exact for them); any other
    exact factors go through the product."""
    r, d_ff = a.shape
    d = b.shape[0]
    an, bn = a.numpy(), b.numpy()
    nonzero = an != 0
    if r <= d_ff and (nonzero.sum(axis=1) == 1).all():
        cols = nonzero.argmax(axis=1)
        if (an[np.arange(r), cols] == 1).all() and len(np.unique(cols)) == r:               # one-hot rows
            order = np.argsort(cols, kind="stable")
            cols, delta = cols[order], bn[:, order]
            keep = (delta != 0).any(axis=0)
            return torch.from_numpy(cols[keep]).long(), torch.from_numpy(np.ascontiguousarray(delta[:, keep]))
    if r == d and np.array_equal(bn, np.eye(d, dtype=bn.dtype)):                           # identity form
        full, nz = an, nonzero
    else:
        full = (b @ a).numpy()
        nz = full != 0
    cols = np.flatnonzero(nz.any(axis=0))
    delta = full if len(cols) == d_ff else full[:, cols]
    return torch.from_numpy(cols).long(), torch.from_numpy(np.ascontiguousarray(delta)).clone()


# -- atomic writes -----------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_file(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content: temp file + fsync + rename."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """atomic_write_file for content that `fill` streams into the open temp file (e.g. a zip archive)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_dir(target: Path, files: dict[str, bytes]) -> Path:
    """Write a directory of files under a dot-named temp dir next to `target`, fsync, then rename it into
    place: the directory appears complete or not at all. `target` must not exist (or be an empty dir)."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AdapterError(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=parent))   # owner pid in the name
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return target


TMP_PREFIX = ".tmp-"
_OWNED_TMP = re.compile(r"^\.tmp-(\d+)-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0          # another user's process, or not a pid at all
    return True


def clean_dead_temps(parent: Path, *, only_adapter_files: bool = True) -> list[str]:
    """Delete `.tmp-<pid>-*` directories in `parent` whose writer process is gone (killed while writing
    an adapter). A live owner's directory is never touched; with `only_adapter_files`, neither is one that
    holds anything but adapter files (so nothing of the user's beside a --save target). Returns the names
    deleted."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = _OWNED_TMP.match(e.name)
        if m is None or not e.is_dir(follow_symlinks=False) or pid_alive(int(m.group(1))):
            continue
        try:
            names = {c.name for c in os.scandir(e.path)}
        except OSError:
            continue
        if only_adapter_files and not names <= set(ADAPTER_FILES):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
    return removed


def save_adapter(lm: LoadedModel, result, directory, *, name: str | None = None) -> Path:
    """Write one fixed RepairResult as a PEFT LoRA adapter directory (atomic). `directory` is the adapter
    directory itself (`PeftModel.from_pretrained(base, directory)` loads it); it must not exist yet or be
    empty. `name` is a human label stored in star.json (default: the fix's first line). Temporaries left
    beside it by an earlier writer that was killed are deleted first."""
    encoded = encode_result(lm, result, name=name)
    directory = Path(directory).expanduser()
    clean_dead_temps(directory.parent)
    return atomic_write_dir(directory, encoded.files)


# -- reading and validation --------------------------------------------------------------------------------


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; AdapterError otherwise. Never
    follows a symbolic link (so never out of the adapter's directory), never blocks on a FIFO or a device
    (checked with lstat before opening, opened with O_NOFOLLOW | O_NONBLOCK, checked again with fstat), and
    never reads more than `limit` + 1 bytes, even from a file that grows while it is read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AdapterError(f"{what} is missing") from None
    except OSError as e:
        raise AdapterError(f"cannot read {what}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise AdapterError(f"{what} is a symbolic link (only regular files are read)")
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{what} is not a regular file")
    if st.st_size > limit:
        raise AdapterError(f"{what} is too large ({st.st_size} bytes, at most {limit})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise AdapterError(f"cannot read {what}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):        # replaced between lstat and open
            raise AdapterError(f"{what} is not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise AdapterError(f"cannot read {what}: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise AdapterError(f"{what} is too large (over {limit} bytes)")
    return b"".join(chunks)


def _read_json(path: Path, what: str) -> dict:
    raw = read_regular_file(path, MAX_JSON_BYTES, what)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{what} is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{what} is not a JSON object")
    return data


def parse_safetensors_header(data: bytes, *, what: str = WEIGHTS_NAME) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a safetensors file's framing without building tensors: {name: (dtype, shape)}."""
    n = len(data)
    if n < 8:
        raise AdapterError(f"{what} is truncated ({n} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(f"{what} is corrupted (header length {header_len})")
    if 8 + header_len > n:
        raise AdapterError(f"{what} is truncated (header needs {8 + header_len} bytes, file has {n})")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{what} is corrupted (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{what} is corrupted (its header is not a JSON object)")
    body = n - 8 - header_len
    out, end = {}, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise AdapterError(f"{what} is corrupted (bad header entry for {key!r})")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise AdapterError(f"{what}: tensor {key} has dtype {dtype}; expected F32, F16 or BF16")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise AdapterError(f"{what} is corrupted (bad shape or offsets for {key!r})")
        start, stop = offsets
        if not 0 <= start <= stop or stop - start != math.prod(shape) * DTYPES[dtype][1]:
            raise AdapterError(f"{what} is corrupted (offsets of {key!r} do not match its shape)")
        if stop > body:
            raise AdapterError(f"{what} is truncated (tensor {key} ends at byte {stop} of {body})")
        end = max(end, stop)
        out[key] = (dtype, tuple(shape))
    if end != body:
        raise AdapterError(f"{what} is corrupted ({body - end} unexpected trailing bytes)")
    return out


MAX_TARGET_MODULES = 4096         # entries of target_modules read at most (star writes one per patched layer)


def _target_list(config: dict) -> list[str]:
    """`target_modules` as a list of module names. Never a regular expression: peft evaluates a string as
    one (`re.fullmatch`), and a hostile pattern can backtrack for hours, so a string is refused."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        shown = targets if len(targets) <= 40 else targets[:39] + "…"
        raise AdapterError(
            f"adapter_config.json: target_modules is a pattern ({shown!r}); only a list of module names is accepted"
        )
    if targets is None:
        return []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError("adapter_config.json: target_modules must be a list of module names")
    if len(targets) > MAX_TARGET_MODULES:
        raise AdapterError(f"adapter_config.json: target_modules has {len(targets)} entries (at most {MAX_TARGET_MODULES})")
    return targets


def _targets(targets: list[str], module: str) -> bool:
    """peft's matching for a list: the exact module path, or a suffix of it at a '.' boundary."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _exact_pattern(config: dict, name: str, modules: set[str]) -> dict:
    """`rank_pattern` / `alpha_pattern` whose keys are module paths of this model, exactly as star writes
    them. peft reads the keys as regular expressions; here they are compared as strings, and any other
    key is refused (so no pattern from a file is ever evaluated)."""
    pattern = config.get(name)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"adapter_config.json: {name} must be an object {{module path: value}}")
    for key in pattern:
        if key not in modules:
            shown = key if len(key) <= 60 else key[:59] + "…"
            raise AdapterError(
                f"adapter_config.json: {name} key {shown!r} is not a module path of this model "
                "(keys are module paths, never patterns)"
            )
    return pattern


# -- what an adapter may do to the model ---------------------------------------------------------------------

MAX_DELTA_RATIO = 100.0
"""An adapter may move a column (neuron) of an output projection by at most this many times the norm of that
column before the patch (columns whose norm is below the layer's median count as the median, so a zero
column is not a loophole). Real STAR patches are far inside it: a dense repair of the default model moves
no column by more than 4 % of its norm; the largest ratio seen, on the tiny random models of the tests
(weights of std 0.02), is 45x. An absurd lora_B (1e4, 1e30) exceeds it by orders of magnitude."""

_HIDDEN_LIMIT = math.sqrt(torch.finfo(torch.float32).max) / 64   # a larger |h| overflows when squared and summed
PROBE_TEXT = "def mean(values):\n    total = sum(values)\n    return total / len(values)\n"


def check_delta_bound(layer: int, columns: torch.Tensor, delta: torch.Tensor, base: torch.Tensor) -> None:
    """Refuse a layer delta that moves any patched column by more than MAX_DELTA_RATIO x its base norm.
    `base` is the layer's (d, d_ff) weight before the patch; `columns`/`delta` the patch's column form."""
    if not len(columns):
        return
    norms = torch.linalg.vector_norm(base.detach().to(torch.float64), dim=0)
    floor = max(float(norms.median()), 1e-12)
    reference = torch.clamp(norms[columns.long()], min=floor)
    moved = torch.linalg.vector_norm(delta.detach().to(torch.float64), dim=0)
    ratio = moved / reference
    worst = int(torch.argmax(ratio))
    if not bool(torch.isfinite(ratio).all()) or float(ratio[worst]) > MAX_DELTA_RATIO:
        raise AdapterError(
            f"layer {layer}: the adapter moves neuron {int(columns[worst])} by {float(ratio[worst]):.3g}x the norm of "
            f"its column (at most {MAX_DELTA_RATIO:g}x is accepted)"
        )


def _probe_ids(lm: LoadedModel) -> torch.Tensor:
    try:
        ids = lm.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer: fall back to fixed ids
        ids = []
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or 2)
    ids = [i for i in ids if isinstance(i, int) and 0 <= i < vocab][:32] or [i % vocab for i in range(1, 17)]
    return torch.tensor([ids])


@torch.no_grad()
def check_probe(lm: LoadedModel, patch: Patch) -> None:
    """Run a fixed probe prompt through the model as it is, with `patch` added on top (through forward hooks
    on the patched output projections: the weights themselves are never written), and refuse the patch if
    the model breaks down numerically: a hidden state that is not finite or so large that its square
    overflows float32 (RMSNorm / LayerNorm then silently return zeros), or logits that are not finite or
    all equal at some position. Callers hold whatever lock guards the model (the stack's)."""
    handles = []
    try:
        for layer, ld in patch.layers.items():
            cols, delta_t = ld.columns.long(), ld.delta.detach().to(torch.float32).T.contiguous()

            def add_delta(_module, inputs, output, cols=cols, delta_t=delta_t):
                return output + inputs[0][..., cols].to(delta_t.dtype) @ delta_t

            handles.append(lm.arch.out_proj(layer).register_forward_hook(add_delta))
        out = lm.model(input_ids=_probe_ids(lm), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    broken = "with this adapter applied the model breaks down on a probe prompt"
    for h in out.hidden_states or ():
        h = h.detach().to(torch.float32)
        if not all_finite(h) or float(h.abs().max()) > _HIDDEN_LIMIT:
            raise AdapterError(f"{broken}: its hidden states overflow (|h| up to {float(h.abs().max()):.3g})")
    logits = out.logits.detach().to(torch.float32)
    if not all_finite(logits):
        raise AdapterError(f"{broken}: its logits are not finite (inf or nan)")
    if bool(((logits.amax(dim=-1) - logits.amin(dim=-1)) <= 0).any()):
        raise AdapterError(f"{broken}: its logits are all equal")


def check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for flag in ("use_dora", "use_rslora", "lora_bias", "use_qalora", "use_bdlora"):
        if config.get(flag):
            raise AdapterError(f"adapter_config.json: {flag} is set; a STAR adapter is a plain LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError("adapter_config.json: bias must be 'none'")
    if config.get("modules_to_save"):
        raise AdapterError("adapter_config.json: modules_to_save is set; a STAR adapter only adds column deltas")
    if config.get("layer_replication"):
        raise AdapterError("adapter_config.json: layer_replication is not supported")
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters", "trainable_token_indices"):
        if config.get(key):
            raise AdapterError(f"adapter_config.json: {key} is set; a STAR adapter names its modules in target_modules only")


# -- star.json as typed data -----------------------------------------------------------------------------------

# The sidecar's schema: what star writes, with the types it writes. Every field present must have its type
# (no coercion: "5" is not an int, true is not 1); unknown fields are ignored (a newer star may add some).


@attrs.define
class _CaseSchema:
    prompt: str
    fix: str
    wrong: str | None = None


@attrs.define
class _BaseModelSchema:
    model_type: str
    n_layers: int
    d_model: int
    d_ff: int
    weights_sha256: dict[str, str]
    name: str | None = None
    out_proj: str | None = None


@attrs.define
class _MetaSchema:
    format: str
    version: int
    base_model: _BaseModelSchema
    name: str | None = None
    created: str | None = None
    method: str | None = None
    config: dict[str, Any] | None = None
    cases: list[_CaseSchema] | None = None
    layers: list[int] | None = None
    neurons: dict[str, int] | None = None
    n_neurons: int | None = None
    encoding: dict[str, str] | None = None
    metrics: dict[str, Any] | None = None
    adapter_sha256: str | None = None


def _strict_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)

    def exactly(t):
        def structure(value, _):
            if not isinstance(value, t) or (isinstance(value, bool) and t is not bool):
                raise TypeError(f"expected {t.__name__}, got {type(value).__name__}")
            return value

        return structure

    for t in (str, int, bool):
        conv.register_structure_hook(t, exactly(t))

    def strict_list(t, converter):
        items = list_structure_factory(t, converter)

        def structure(value, _):
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return items(value, _)

        return structure

    conv.register_structure_hook_factory(is_sequence, strict_list)
    return conv


_META_CONVERTER = _strict_converter()


def check_meta_types(meta: dict) -> None:
    """star.json against the typed schema; AdapterError naming the first wrong field."""
    if meta.get("format") != FORMAT:
        raise AdapterError("star.json is not a STAR adapter description")
    try:
        _META_CONVERTER.structure(meta, _MetaSchema)
    except (cattrs.BaseValidationError, TypeError, ValueError) as e:
        problems = cattrs.transform_error(e, path="star.json") if isinstance(e, cattrs.BaseValidationError) else [str(e)]
        first = problems[0] if problems else type(e).__name__
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"star.json has a field of the wrong type: {first}{more}") from None


MAX_CASES = 8                # stored cases per adapter: each is re-checked (greedy decoding) whenever a
MAX_CASE_TOKENS = 2048       # patch is applied anew, so their count and length bound that cost
MAX_CASES_TOKENS = 4096      # all cases of one adapter together


def check_cases(meta: dict, lm: LoadedModel) -> None:
    """Bound the stored cases (count, tokens of prompt + fix) so that re-checking them stays cheap."""
    cases = meta.get("cases") or []
    if len(cases) > MAX_CASES:
        raise AdapterError(f"star.json holds {len(cases)} cases; at most {MAX_CASES} are accepted")
    total = 0
    for n, case in enumerate(cases, start=1):
        text = case["prompt"] + case["fix"]
        if len(text) > 64 * MAX_CASE_TOKENS:
            raise AdapterError(f"star.json case {n} is {len(text)} characters long (at most {64 * MAX_CASE_TOKENS})")
        tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (case["prompt"], case["fix"]))
        if tokens > MAX_CASE_TOKENS:
            raise AdapterError(f"star.json case {n} is {tokens} tokens long; at most {MAX_CASE_TOKENS} per case are accepted")
        total += tokens
        if total > MAX_CASES_TOKENS:
            raise AdapterError(f"star.json's cases are over {MAX_CASES_TOKENS} tokens together")


def check_meta(meta: dict, lm: LoadedModel) -> dict:
    check_meta_types(meta)
    check_cases(meta, lm)
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise AdapterError("star.json has no valid version")
    if version > FORMAT_VERSION:
        raise AdapterError(f"star.json has format version {version}; this star reads up to {FORMAT_VERSION}")
    base = meta.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("weights_sha256"), dict):
        raise AdapterError("star.json has no base-model fingerprint")
    mine = architecture(lm)
    made_for = f"{base.get('name', '?')} ({base.get('model_type')}, {base.get('n_layers')} layers, d={base.get('d_model')}, d_ff={base.get('d_ff')})"
    this = f"{lm.name} ({mine['model_type']}, {mine['n_layers']} layers, d={mine['d_model']}, d_ff={mine['d_ff']})"
    for key in ("model_type", "n_layers", "d_model", "d_ff"):
        if base.get(key) != mine[key]:
            raise AdapterError(f"made for a different model: {made_for}, this is {this}")
    return base


def _weight_files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_file() or p.is_symlink())
    except OSError as e:
        raise AdapterError(f"cannot read {directory}: {e.strerror}") from None


def load_adapter(
    lm: LoadedModel,
    directory,
    *,
    base_digest=None,
    max_bytes: int = MAX_BYTES,
    adapter_id: str | None = None,
    base_columns=None,
    probe: bool = True,
) -> Adapter:
    """Validate an adapter directory against this model and read it. Nothing is applied; the model is only
    read (to fingerprint the base weights, bound the deltas and run the probe). Raises AdapterError with a
    one-line reason.

    `base_digest(layer)` gives the sha256 of the *base* weights of a layer (PatchStack passes its own,
    since its model has patches applied); by default the model's current weights. `base_columns(layer)`
    gives the (d, d_ff) weight the delta bound is measured against; by default the model's current weights
    (the base plus whatever patches are applied). `probe`: run `check_probe` with the patch on top of the
    model as it is now."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not an adapter directory")
    files = _weight_files(directory)
    pickles = [p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise AdapterError(f"{pickles[0]} is a pickle file: only safetensors adapters are accepted (never pickle)")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file() and not weights_path.is_symlink():
        raise AdapterError(f"no {WEIGHTS_NAME} in {directory.name}")
    meta = _read_json(directory / META_NAME, META_NAME + " (STAR metadata)")
    base = check_meta(meta, lm)
    config = _read_json(directory / CONFIG_NAME, CONFIG_NAME)
    check_config(config)

    try:
        size = weights_path.lstat().st_size
    except OSError as e:
        raise AdapterError(f"cannot read {WEIGHTS_NAME}: {e.strerror}") from None
    if size > max_bytes:
        raise AdapterError(f"{WEIGHTS_NAME} is {size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    data = read_regular_file(weights_path, max_bytes, WEIGHTS_NAME)
    header = parse_safetensors_header(data)
    sha = hashlib.sha256(data).hexdigest()
    expected_sha = meta.get("adapter_sha256")
    if expected_sha is not None and expected_sha != sha:
        raise AdapterError(f"{WEIGHTS_NAME} is corrupted (its sha256 does not match star.json)")

    # Keys and shapes, before any tensor is built.
    arch = lm.arch
    d, d_ff = arch.d_model, arch.d_ff
    by_key = {}
    for layer in range(arch.n_layers):
        key_a, key_b = _keys(lm, layer)
        by_key[key_a], by_key[key_b] = (layer, "A"), (layer, "B")
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, (_dtype, shape) in header.items():
        if key not in by_key:
            raise AdapterError(f"unexpected tensor {key!r}: not a LoRA factor of this model's FFN output projections")
        layer, which = by_key[key]
        found.setdefault(layer, {})[which] = shape
    if not found:
        raise AdapterError(f"{WEIGHTS_NAME} holds no tensors")
    ranks = {}
    for layer, parts in sorted(found.items()):
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise AdapterError(f"layer {layer}: lora_{missing} is missing")
        if len(parts["A"]) != 2 or len(parts["B"]) != 2:
            raise AdapterError(f"layer {layer}: LoRA factors must be matrices")
        (ra, ca), (rb_d, rb_r) = parts["A"], parts["B"]
        if ca != d_ff or rb_d != d or ra != rb_r or ra < 1:
            raise AdapterError(
                f"layer {layer}: lora_A {list(parts['A'])} / lora_B {list(parts['B'])} do not fit this model "
                f"(expected [r, {d_ff}] and [{d}, r])"
            )
        ranks[layer] = ra

    # Config: every module targeted, scale alpha / r exactly 1 (no pattern is ever evaluated).
    modules = {arch.out_proj_name(l) for l in range(arch.n_layers)}
    targets = _target_list(config)
    rank_pattern = _exact_pattern(config, "rank_pattern", modules)
    alpha_pattern = _exact_pattern(config, "alpha_pattern", modules)
    for layer, r in ranks.items():
        module = arch.out_proj_name(layer)
        if not _targets(targets, module):
            raise AdapterError(f"adapter_config.json does not target {module}")
        r_cfg = rank_pattern.get(module, config.get("r", 8))
        alpha = alpha_pattern.get(module, config.get("lora_alpha", 8))
        if isinstance(r_cfg, bool) or not isinstance(r_cfg, int) or r_cfg != r:
            raise AdapterError(f"adapter_config.json gives {module} rank {r_cfg}, the weights have rank {r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != r:
            raise AdapterError(f"adapter_config.json: lora_alpha of {module} is {alpha}, expected r = {r} (scale 1)")

    # Fingerprint of the base weights.
    layers_meta = meta.get("layers")
    if layers_meta is not None and sorted(layers_meta) != sorted(ranks):
        raise AdapterError("star.json lists other layers than the weights hold")
    digests = base["weights_sha256"]
    base_digest = base_digest or current_digest(lm)
    differ = [l for l in sorted(ranks) if digests.get(str(l)) != base_digest(l)]
    if differ:
        shown = ", ".join(map(str, differ[:5])) + (" ..." if len(differ) > 5 else "")
        raise AdapterError(
            f"made for a different base model ({base.get('name', '?')}): the weights of layer(s) {shown} differ"
        )

    # Now build the tensors (safetensors, no pickle) and check their values.
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - the library raises its own error types
        raise AdapterError(f"{WEIGHTS_NAME} is corrupted ({str(e)[:80]})") from None
    patch = Patch()
    for layer in sorted(ranks):
        key_a, key_b = _keys(lm, layer)
        a, b = tensors[key_a].to(torch.float32), tensors[key_b].to(torch.float32)
        if not (all_finite(a) and all_finite(b)):
            raise AdapterError(f"layer {layer}: the adapter holds non-finite values (inf or nan)")
        cols, delta = decode_factors(a, b)
        if not all_finite(delta):
            raise AdapterError(f"layer {layer}: the adapter's delta overflows")
        check_delta_bound(layer, cols, delta, base_columns(layer) if base_columns else arch.columns(layer))
        if len(cols):
            patch.layers[layer] = LayerDelta(cols, delta)
    if probe and patch.layers:
        check_probe(lm, patch)
    encoding = {int(k): v for k, v in (meta.get("encoding") or {}).items() if str(k).isdigit()}
    return Adapter(
        id=adapter_id or directory.name,
        path=directory,
        meta=meta,
        config=config,
        patch=patch,
        size_bytes=sum(p.lstat().st_size for p in files),
        weights_sha256=sha,
        encoding=encoding,
    )


def valid_name(name: str) -> bool:
    return bool(_NAME_OK.match(name))
