"""Trained models as artifacts: what a finished stage leaves for the next one.

A model artifact is a directory with ``spec.json`` (how to rebuild the architecture: registry
name, constructor kwargs, classes, channels, weight bits, and which state directory is
current) and ``state-<ns>/`` (its ``params`` and ``rest`` written by orbax, no pickle). Saving
again replaces it atomically: a reader sees the old artifact or the new one. Any stage, the
audit or a notebook can load it without the config or the training state (optimizer moments,
RNG) of the run that made it::

    model = artifacts.load_model("runs/fmnist_pair/teacher/model")
    logits, _ = models.apply_model(model.graphdef, model.params, model.rest, images)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ptq_adversary import checkpoint, distributed, io, models, policy
from ptq_adversary.policy import PolicyNet

__all__ = [
    "ArtifactError",
    "ModelSpec",
    "LoadedModel",
    "PolicySpec",
    "LoadedPolicy",
    "save_model",
    "load_model",
    "save_policy",
    "load_policy",
    "build",
    "build_policy",
    "exists",
]

_SPEC_FILE = "spec.json"
_STATE_DIR = "state"
_STATE_KEY = "_state_dir"  # in spec.json: which state directory is current


class ArtifactError(checkpoint.CheckpointError):
    """An artifact's arrays cannot be restored: its files are damaged or missing, or its
    ``spec.json`` describes another architecture than the arrays hold.

    ``str(err)`` is one line naming the artifact and what to do.
    """


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture.

    Attributes:
      name: a key of ``models.MODELS``, or a label for a user model built by ``factory``.
      num_classes, in_channels: the data's.
      weight_bits: static weight bit-width of the quantized program (``None``: FP weights).
      kwargs: architecture arguments of the constructor.
      image_size: ``(H, W)`` of the inputs (fixes the program the sites are derived from).
      factory: ``"package.module:function"`` building a user's own ``nnx.Module`` as
        ``function(num_classes=, in_channels=, rngs=, **kwargs)``; ``None`` for the registry.
    """

    name: str
    num_classes: int
    in_channels: int
    weight_bits: int | None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    image_size: tuple[int, int] = (32, 32)
    factory: str | None = None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A restored model, split for the functional API (see ``models.apply_model``)."""

    spec: ModelSpec
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State
    num_sites: int
    site_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild a bit-width policy: its network and its budget."""

    num_sites: int
    in_channels: int
    choices: tuple[int, ...]
    budget: float
    widths: tuple[int, ...] = (8, 16)

    @property
    def budget_spec(self) -> policy.Budget:
        return policy.Budget(tuple(self.choices), self.num_sites, self.budget)


@dataclasses.dataclass(frozen=True)
class LoadedPolicy:
    """A restored policy, split for the functional API."""

    spec: PolicySpec
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State


def build_policy(spec: PolicySpec, seed: int = 0) -> PolicyNet:
    """A freshly initialised policy network of ``spec``."""
    return PolicyNet(
        num_sites=spec.num_sites,
        num_choices=len(spec.choices),
        in_channels=spec.in_channels,
        widths=tuple(spec.widths),
        rngs=nnx.Rngs(seed),
    )


def build(spec: ModelSpec, seed: int = 0) -> models.QuantizedModel:
    """A freshly initialised model of ``spec``'s architecture (inference mode)."""
    if spec.factory is None:
        return models.create_model(
            spec.name,
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            image_size=tuple(spec.image_size),
            weight_bits=spec.weight_bits,
            rngs=nnx.Rngs(seed),
            **spec.kwargs,
        )
    net = models.load_factory(spec.factory)(
        num_classes=spec.num_classes, in_channels=spec.in_channels, rngs=nnx.Rngs(seed),
        **spec.kwargs,
    )  # fmt: skip
    if not isinstance(net, nnx.Module):
        raise TypeError(f"{spec.factory} returned {type(net).__name__}, not an nnx.Module")
    net.eval()
    return models.QuantizedModel(
        net, input_shape=(*spec.image_size, spec.in_channels), weight_bits=spec.weight_bits
    )


def _save(directory: str, spec: Any, params: nnx.State, rest: nnx.State) -> None:
    # Atomic replacement: the arrays go to a fresh state directory, then spec.json (written by
    # rename) switches to it, then older state directories are removed. A kill at any point
    # leaves either the previous artifact or the new one loadable, never a mix.
    # With several processes all of them save under process 0's name (orbax's barriers are
    # keyed by the path: different names wait for each other forever), process 0 alone
    # switches and cleans up, and nobody leaves before the artifact is complete.
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    name = f"{_STATE_DIR}-{distributed.agreed_stamp()}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            os.path.join(directory, name),
            jax.device_get({"params": params, "rest": rest}),
            force=True,
        )
    if jax.process_index() == 0:
        record = {**dataclasses.asdict(spec), _STATE_KEY: name}
        io.write_json_atomic(os.path.join(directory, _SPEC_FILE), record)
        for entry in os.scandir(directory):
            if entry.is_dir() and entry.name.startswith(_STATE_DIR) and entry.name != name:
                shutil.rmtree(entry.path, ignore_errors=True)
    distributed.barrier(f"artifact {directory} {name}")


def _load(directory: str, spec_type: type, make: Any) -> tuple[Any, nnx.Module, dict]:
    directory = os.path.abspath(directory)
    if not exists(directory):
        raise FileNotFoundError(f"no artifact ({_SPEC_FILE}) in {directory}")
    raw = io.read_json(os.path.join(directory, _SPEC_FILE))
    state_dir = raw.pop(_STATE_KEY, _STATE_DIR)  # artifacts written before: plain "state"
    spec = spec_type(**{k: _tuples(v) for k, v in raw.items()})
    module = make(spec)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    target = {"params": params, "rest": rest}
    previous_hook = checkpoint.silence_closed_loop_callbacks()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(
                os.path.join(directory, state_dir),
                jax.tree.map(ocp.utils.to_shape_dtype_struct, target),
            )
    except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types)
        raise ArtifactError(
            f"artifact {directory} cannot be restored ({checkpoint.error_reason(err)}): its "
            f"{state_dir}/ is damaged or missing, or its {_SPEC_FILE} does not describe it; "
            "re-run the stage that wrote it"
        ) from err
    sys.unraisablehook = previous_hook  # restored cleanly: nothing left in flight
    return spec, module, {"graphdef": graphdef, **restored}


def _tuples(value: Any) -> Any:
    # JSON turns tuples into lists; specs and constructor kwargs want them back (hashable).
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def save_model(directory: str, spec: ModelSpec, params: nnx.State, rest: nnx.State) -> None:
    """Writes a model artifact to ``directory`` (replacing an older one there)."""
    _save(directory, spec, params, rest)


def save_policy(directory: str, spec: PolicySpec, params: nnx.State, rest: nnx.State) -> None:
    """Writes a policy artifact to ``directory`` (replacing an older one there)."""
    _save(directory, spec, params, rest)


def exists(directory: str) -> bool:
    """Whether ``directory`` holds a complete model artifact."""
    return os.path.exists(os.path.join(directory, _SPEC_FILE))


def load_model(directory: str) -> LoadedModel:
    """Restores a model artifact written by :func:`save_model`.

    Raises:
      FileNotFoundError: ``directory`` holds no complete artifact.
      ArtifactError: its arrays are damaged or missing, or do not match its ``spec.json``.
    """
    spec, model, parts = _load(directory, ModelSpec, build)
    return LoadedModel(
        spec=spec, num_sites=model.num_sites, site_names=tuple(model.site_names), **parts
    )


def load_policy(directory: str) -> LoadedPolicy:
    """Restores a policy artifact written by :func:`save_policy`.

    Raises:
      FileNotFoundError: ``directory`` holds no complete artifact.
      ArtifactError: its arrays are damaged or missing, or do not match its ``spec.json``.
    """
    spec, _, parts = _load(directory, PolicySpec, build_policy)
    return LoadedPolicy(spec=spec, **parts)
