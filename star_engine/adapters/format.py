"""One patch as one PEFT LoRA adapter directory, exactly, plus the `star.json` sidecar.

Encoding (per patched layer, whichever is smaller; both are exact and vanilla `peft` loads both):

* one-hot:  r = k (number of patched neurons), lora_A (k, d_ff) one-hot rows selecting the neurons
            (stored as float8 e4m3, one byte: 0 and 1 are exact, and A is most of the file), lora_B (d, k)
            = the delta columns;
* identity: r = d, lora_B = I_d, lora_A (d, d_ff) = the dense delta (untouched columns zero).

Deltas are float16 (a repair rounds them to it before it verifies the fix, star_engine.patch), float32 when
a value does not fit; loading casts every factor to float32, as peft's own loading does.

`lora_alpha = r` per module through `rank_pattern` / `alpha_pattern`, so PEFT's scale is exactly 1 and the
applied delta is B @ A. Reading never unpickles: only safetensors, whose header is checked before any tensor
is built, and nothing touches the model until every check passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..model import LoadedModel
from ..text import excerpt
from ..patch import STORAGE_DTYPE, LayerDelta, Patch, SavedColumns, is_storable
from .atomic import atomic_write_dir, clean_dead_temps
from .sidecar import FORMAT, FORMAT_VERSION, META_NAME, Sidecar, read_sidecar, sidecar_from_dict
from .untrusted import AdapterError, is_pickle, read_json_object, read_regular_file

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, META_NAME)
MAX_BYTES = 512 * 2**20            # default size limit of one adapter's weights (configurable)
DTYPES = ("F32", "F16", "BF16", "F8_E4M3")
ONE_HOT_DTYPE = torch.float8_e4m3fn   # 0 and 1 exactly, in one byte
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass
class Adapter:
    """A validated adapter, read into memory; `patch` holds the exact column deltas B @ A."""

    id: str
    path: Path
    sidecar: Sidecar
    patch: Patch
    weights_sha256: str

    @property
    def cases(self):
        return self.sidecar.repair_cases


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
        stored = STORAGE_DTYPE if is_storable(delta) else torch.float32
        if k <= d:
            a = torch.zeros(k, d_ff, dtype=ONE_HOT_DTYPE)
            a[torch.arange(k), cols] = 1.0
            b = delta.to(stored)
            ranks[layer], encodings[layer] = k, "one-hot"
        else:
            a = torch.zeros(d, d_ff, dtype=stored)
            a[:, cols] = delta.to(stored)
            b = torch.eye(d, dtype=stored)
            ranks[layer], encodings[layer] = d, "identity"
        key_a, key_b = _keys(lm, layer)
        tensors[key_a], tensors[key_b] = a.contiguous(), b.contiguous()
    return tensors, ranks, encodings


def peft_config(lm: LoadedModel, ranks: dict[int, int]) -> dict:
    """A minimal adapter_config.json that old and new PEFT versions load, with scale alpha / r = 1."""
    per_module = {lm.arch.out_proj_name(l): r for l, r in sorted(ranks.items())}
    first = ranks[min(ranks)]
    path = Path(lm.path)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(path.resolve()) if (path / "config.json").is_file() else lm.name,
        "r": first,
        "lora_alpha": first,
        "rank_pattern": per_module,
        "alpha_pattern": dict(per_module),
        "target_modules": list(per_module),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(lm.arch.spec.conv1d),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _slug(text: str, n: int = 24) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n].strip("-") or "patch"


@dataclass
class Encoded:
    """An adapter's files, ready to be written."""

    files: dict[str, bytes]
    weights_sha256: str
    sidecar: Sidecar

    def default_id(self) -> str:
        cases = self.sidecar.cases or []
        fix = cases[0].fix if cases else ""
        return f"{self.weights_sha256[:10]}-{_slug(str(self.sidecar.name or fix))}"


def encode_result(lm: LoadedModel, result, *, name: str | None = None, base_digest=None) -> Encoded:
    """A fixed RepairResult's adapter files. `base_digest(layer)` fingerprints the weights the patch applies
    to; by default the weights as they were before the repair (the current ones with result.saved put back)."""
    if not getattr(result, "fixed", False) or result.patch is None:
        raise AdapterError("only a repair that fixed its case(s) can be saved")
    patch = result.patch
    if not patch.layers:
        raise AdapterError("the patch is empty: nothing to save")
    base_digest = base_digest or _base_digest_from_saved(lm, result.saved)
    tensors, ranks, encodings = encode_patch(lm, patch)
    weights = st_save(tensors, metadata={"format": "pt"})
    sha = hashlib.sha256(weights).hexdigest()
    cases = [{"prompt": c.prompt, "wrong": c.before, "fix": c.fix} for c in result.cases]
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name or (cases[0]["fix"] if cases else "").strip().split("\n")[0][:80],
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_model": {
            "name": lm.name,
            **architecture(lm),
            "weights_sha256": {str(l): base_digest(l) for l in patch.layer_ids},
        },
        "method": result.method,
        "config": dict(result.config),
        "cases": cases,
        "layers": patch.layer_ids,
        "neurons": {str(l): len(patch.layers[l].columns) for l in patch.layer_ids},
        "n_neurons": patch.n_neurons,
        "encoding": {str(l): encodings[l] for l in patch.layer_ids},
        "metrics": {
            "seconds": round(float(result.seconds), 3),
            "reason": result.reason,
            "cases": [{"em_before": c.em_before, "em_after": c.em_after, "after": c.after} for c in result.cases],
        },
        "adapter_sha256": sha,
    }
    files = {
        WEIGHTS_NAME: weights,
        CONFIG_NAME: (json.dumps(peft_config(lm, ranks), indent=2) + "\n").encode(),
        META_NAME: (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode(),
    }
    return Encoded(files, sha, sidecar_from_dict(meta))


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


# -- writing -----------------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_adapter_dir(target: Path, files: dict[str, bytes]) -> Path:
    """An adapter's files as one directory that appears complete or not at all; `target` must not exist
    yet (or be an empty directory)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AdapterError(f"{target} already exists")

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            _write_file(tmp / name, data)

    return atomic_write_dir(target, fill)


def save_adapter(lm: LoadedModel, result, directory, *, name: str | None = None) -> Path:
    """Write one fixed RepairResult as a PEFT LoRA adapter directory (atomic). `directory` is the adapter
    directory itself (`PeftModel.from_pretrained(base, directory)` loads it); it must not exist yet or be
    empty. `name` is a human label stored in star.json (default: the fix's first line). Temporaries left
    beside it by an earlier writer that was killed are deleted first."""
    encoded = encode_result(lm, result, name=name)
    directory = Path(directory).expanduser()
    clean_dead_temps(directory.parent, only_holding=ADAPTER_FILES)
    return write_adapter_dir(directory, encoded.files)


# -- reading: the weights file and the config ----------------------------------------------------------------


def tensor_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, without building a tensor. Only call it on
    a path read_regular_file accepted (a regular file, not a link: opening a FIFO would block)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except SafetensorError as e:
        problem = str(e).removeprefix("Error while deserializing header: ")
        if problem in ("header too small", "invalid header length"):
            raise AdapterError(f"{WEIGHTS_NAME} is truncated ({problem})") from None
        if problem.startswith("incomplete metadata"):
            raise AdapterError(f"{WEIGHTS_NAME} is truncated or has trailing bytes ({problem})") from None
        raise AdapterError(f"{WEIGHTS_NAME} is corrupted ({problem[:80]})") from None


MAX_TARGET_MODULES = 4096         # entries of target_modules read at most (star writes one per patched layer)


def _names(config: dict, key: str, verb: str = "is") -> list[str] | None:
    """A bounded list of module names from the config. A string is refused: peft reads it as a regular
    expression, and a hostile one can backtrack for hours."""
    value = config.get(key)
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        raise AdapterError(f"adapter_config.json: {key} {verb} a pattern ({excerpt(value)!r}); only a list of module names is accepted")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise AdapterError(f"adapter_config.json: {key} must be a list of module names")
    if len(value) > MAX_TARGET_MODULES:
        raise AdapterError(f"adapter_config.json: {key} has {len(value)} entries (at most {MAX_TARGET_MODULES})")
    return value


def _layer_indexes(config: dict) -> int | list[int] | None:
    value = config.get("layers_to_transform")
    indexes = value if isinstance(value, list) else [value]
    plain = len(indexes) <= MAX_TARGET_MODULES and all(isinstance(i, int) and not isinstance(i, bool) for i in indexes)
    if value is not None and not plain:
        raise AdapterError("adapter_config.json: layers_to_transform must be a layer index or a list of them")
    return value


def peft_targets(config: dict) -> SimpleNamespace:
    """The config's module selection, validated so that peft's own matching can run on it without
    evaluating a pattern from the file: target_modules and exclude_modules as lists of names (peft's exact
    or '.'-suffix match), layers_to_transform as indexes (layers_pattern, a regex fragment, is refused)."""
    return SimpleNamespace(
        target_modules=_names(config, "target_modules") or [],
        exclude_modules=_names(config, "exclude_modules", "is set to"),
        layers_to_transform=_layer_indexes(config),
        layers_pattern=None,
        modules_to_save=None,
        target_parameters=None,
    )


def _exact_pattern(config: dict, name: str, modules: set[str]) -> dict:
    """`rank_pattern` / `alpha_pattern` whose keys are module paths of this model, exactly as star writes
    them. peft reads the keys as regular expressions: any other key is refused, so that only star's own
    module names are ever matched."""
    pattern = config.get(name)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"adapter_config.json: {name} must be an object {{module path: value}}")
    for key in pattern:
        if key not in modules:
            raise AdapterError(
                f"adapter_config.json: {name} key {excerpt(key, 60)!r} is not a module path of this model "
                "(keys are module paths, never patterns)"
            )
    return pattern


_REFUSED_CONFIG = {     # a config key a STAR adapter never sets -> why
    **dict.fromkeys(("use_dora", "use_rslora", "lora_bias", "use_qalora", "use_bdlora"), "a STAR adapter is a plain LoRA"),
    "modules_to_save": "a STAR adapter only adds column deltas",
    "layer_replication": "it is not supported",
    **dict.fromkeys(("layers_pattern", "target_parameters", "trainable_token_indices"),
                    "a STAR adapter names its modules in target_modules only"),
}


def check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("bias", "none") != "none":
        raise AdapterError("adapter_config.json: bias must be 'none'")
    for key, why in _REFUSED_CONFIG.items():
        if config.get(key):
            raise AdapterError(f"adapter_config.json: {key} is set; {why}")


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


# -- star.json against this model --------------------------------------------------------------------------

MAX_CASES = 8                # stored cases per adapter: each is re-checked (greedy decoding) whenever a
MAX_CASE_TOKENS = 2048       # patch is applied anew, so their count and length bound that cost
MAX_CASES_TOKENS = 4096      # all cases of one adapter together


def check_cases(sidecar: Sidecar, lm: LoadedModel) -> None:
    """Bound the stored cases (count, tokens of prompt + fix) so that re-checking them stays cheap."""
    cases = sidecar.cases or []
    if len(cases) > MAX_CASES:
        raise AdapterError(f"star.json holds {len(cases)} cases; at most {MAX_CASES} are accepted")
    total = 0
    for n, case in enumerate(cases, start=1):
        text = case.prompt + case.fix
        if len(text) > 64 * MAX_CASE_TOKENS:
            raise AdapterError(f"star.json case {n} is {len(text)} characters long (at most {64 * MAX_CASE_TOKENS})")
        tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (case.prompt, case.fix))
        if tokens > MAX_CASE_TOKENS:
            raise AdapterError(f"star.json case {n} is {tokens} tokens long; at most {MAX_CASE_TOKENS} per case are accepted")
        total += tokens
        if total > MAX_CASES_TOKENS:
            raise AdapterError(f"star.json's cases are over {MAX_CASES_TOKENS} tokens together")


def check_base_model(sidecar: Sidecar, lm: LoadedModel) -> None:
    base, mine = sidecar.base_model, architecture(lm)
    if [base.model_type, base.n_layers, base.d_model, base.d_ff] != [mine[k] for k in ("model_type", "n_layers", "d_model", "d_ff")]:
        made_for = f"{base.name or '?'} ({base.model_type}, {base.n_layers} layers, d={base.d_model}, d_ff={base.d_ff})"
        this = f"{lm.name} ({mine['model_type']}, {mine['n_layers']} layers, d={mine['d_model']}, d_ff={mine['d_ff']})"
        raise AdapterError(f"made for a different model: {made_for}, this is {this}")


# -- loading: the steps ------------------------------------------------------------------------------------


def load_adapter(lm: LoadedModel, directory, *, base_digest=None, max_bytes: int = MAX_BYTES,
                 adapter_id: str | None = None, base_columns=None, probe: bool = True) -> Adapter:
    """Validate an adapter directory against this model and read it; AdapterError with a one-line reason.
    Nothing is applied: the model is only read (to fingerprint the base weights, bound the deltas and, with
    `probe`, run `check_probe` with the patch on top of the model as it is now).

    `base_digest(layer)`: the sha256 of a layer's *base* weights (PatchStack passes its own: its model has
    patches applied); `base_columns(layer)`: the (d, d_ff) weight the delta bound is measured against. Both
    default to the model's current weights (the base plus whatever patches are applied)."""
    directory = Path(directory)
    _check_files(directory)
    sidecar = read_sidecar(directory)
    check_cases(sidecar, lm)
    check_base_model(sidecar, lm)
    config = read_json_object(directory / CONFIG_NAME, CONFIG_NAME)
    check_config(config)
    data = read_weights(directory / WEIGHTS_NAME, max_bytes)
    shapes = tensor_shapes(directory / WEIGHTS_NAME)
    sha = hashlib.sha256(data).hexdigest()
    if sidecar.adapter_sha256 is not None and sidecar.adapter_sha256 != sha:
        raise AdapterError(f"{WEIGHTS_NAME} is corrupted (its sha256 does not match star.json)")
    ranks = _ranks(lm, shapes)
    _check_targets(lm, config, ranks)
    _check_fingerprint(lm, sidecar, ranks, base_digest or (lambda layer: layer_digest(lm.arch.columns(layer))))
    patch = _decode_patch(lm, data, shapes, ranks, base_columns or lm.arch.columns)
    if probe and patch.layers:
        check_probe(lm, patch)
    return Adapter(id=adapter_id or directory.name, path=directory, sidecar=sidecar, patch=patch, weights_sha256=sha)


def _check_files(directory: Path) -> None:
    """An adapter directory, with a weights file and no pickle."""
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not an adapter directory")
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() or p.is_symlink())
    except OSError as e:
        raise AdapterError(f"cannot read {directory}: {e.strerror}") from None
    if pickle := next((n for n in names if is_pickle(n)), None):
        raise AdapterError(f"{pickle} is a pickle file: only safetensors adapters are accepted (never pickle)")
    if WEIGHTS_NAME not in names:
        raise AdapterError(f"no {WEIGHTS_NAME} in {directory.name}")


def read_weights(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.lstat().st_size
    except OSError as e:
        raise AdapterError(f"cannot read {WEIGHTS_NAME}: {e.strerror}") from None
    if size > max_bytes:
        raise AdapterError(f"{WEIGHTS_NAME} is {size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    return read_regular_file(path, max_bytes, WEIGHTS_NAME)


def _ranks(lm: LoadedModel, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[int, int]:
    """{layer: r} of the LoRA factors, every tensor a factor of an FFN output projection that fits it."""
    arch = lm.arch
    d, d_ff = arch.d_model, arch.d_ff
    by_key = {key: (layer, which) for layer in range(arch.n_layers) for key, which in zip(_keys(lm, layer), "AB")}
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, (dtype, shape) in shapes.items():
        if dtype not in DTYPES:
            raise AdapterError(f"{WEIGHTS_NAME}: tensor {key} has dtype {dtype}; expected F32, F16, BF16 or F8_E4M3")
        if key not in by_key:
            raise AdapterError(f"unexpected tensor {key!r}: not a LoRA factor of this model's FFN output projections")
        layer, which = by_key[key]
        found.setdefault(layer, {})[which] = shape
    if not found:
        raise AdapterError(f"{WEIGHTS_NAME} holds no tensors")
    ranks = {}
    for layer, parts in sorted(found.items()):
        if len(parts) < 2:
            raise AdapterError(f"layer {layer}: lora_{'B' if 'A' in parts else 'A'} is missing")
        if len(parts["A"]) != 2 or len(parts["B"]) != 2:
            raise AdapterError(f"layer {layer}: LoRA factors must be matrices")
        (ra, ca), (rb_d, rb_r) = parts["A"], parts["B"]
        if ca != d_ff or rb_d != d or ra != rb_r or ra < 1:
            raise AdapterError(
                f"layer {layer}: lora_A {list(parts['A'])} / lora_B {list(parts['B'])} do not fit this model "
                f"(expected [r, {d_ff}] and [{d}, r])"
            )
        ranks[layer] = ra
    return ranks


def _check_targets(lm: LoadedModel, config: dict, ranks: dict[int, int]) -> None:
    """peft targets every patched module (by its own matching) at scale alpha / r exactly 1."""
    arch = lm.arch
    targets = peft_targets(config)
    modules = {arch.out_proj_name(l) for l in range(arch.n_layers)}
    rank_pattern = _exact_pattern(config, "rank_pattern", modules)
    alpha_pattern = _exact_pattern(config, "alpha_pattern", modules)
    for layer, r in ranks.items():
        module = arch.out_proj_name(layer)
        if not check_target_module_exists(targets, module):
            raise AdapterError(f"adapter_config.json does not target {module}")
        r_cfg = rank_pattern.get(get_pattern_key(rank_pattern, module), config.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
        if isinstance(r_cfg, bool) or not isinstance(r_cfg, int) or r_cfg != r:
            raise AdapterError(f"adapter_config.json gives {module} rank {r_cfg}, the weights have rank {r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != r:
            raise AdapterError(f"adapter_config.json: lora_alpha of {module} is {alpha}, expected r = {r} (scale 1)")


def _check_fingerprint(lm: LoadedModel, sidecar: Sidecar, ranks: dict[int, int], base_digest) -> None:
    """The patched layers' base weights are the ones the patch was made on."""
    if sidecar.layers is not None and sorted(sidecar.layers) != sorted(ranks):
        raise AdapterError("star.json lists other layers than the weights hold")
    digests = sidecar.base_model.weights_sha256
    differ = [l for l in sorted(ranks) if digests.get(str(l)) != base_digest(l)]
    if differ:
        shown = ", ".join(map(str, differ[:5])) + (" ..." if len(differ) > 5 else "")
        raise AdapterError(
            f"made for a different base model ({sidecar.base_model.name or '?'}): the weights of layer(s) {shown} differ"
        )


def _decode_patch(lm: LoadedModel, data: bytes, shapes: dict, ranks: dict[int, int], base_columns) -> Patch:
    """The tensors, built now (safetensors, no pickle), as column deltas whose values are checked."""
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - the library raises its own error types
        raise AdapterError(f"{WEIGHTS_NAME} is corrupted ({str(e)[:80]})") from None
    if {k: tuple(t.shape) for k, t in tensors.items()} != {k: shape for k, (_, shape) in shapes.items()}:
        raise AdapterError(f"{WEIGHTS_NAME} changed while it was read")
    patch = Patch()
    for layer in sorted(ranks):
        key_a, key_b = _keys(lm, layer)
        a, b = tensors[key_a].to(torch.float32), tensors[key_b].to(torch.float32)
        if not (all_finite(a) and all_finite(b)):
            raise AdapterError(f"layer {layer}: the adapter holds non-finite values (inf or nan)")
        cols, delta = decode_factors(a, b)
        if not all_finite(delta):
            raise AdapterError(f"layer {layer}: the adapter's delta overflows")
        check_delta_bound(layer, cols, delta, base_columns(layer))
        if len(cols):
            patch.layers[layer] = LayerDelta(cols, delta)
    return patch


def valid_name(name: str) -> bool:
    return bool(_NAME_OK.match(name))
