"""symatomic's model in metatrain's :class:`~metatrain.utils.abc.ModelInterface`.

:class:`SymatomicMTT` holds a :class:`~symatomic.model.SymatomicModel` built from
metatrain's :class:`~metatrain.utils.data.DatasetInfo` and returns its outputs in the
layouts metatrain declares for the targets (:attr:`TargetInfo.layout
<metatrain.utils.data.TargetInfo>`): the same keys, components and properties. The
only transformation is for Cartesian targets, which the model learns as spherical
blocks and which are rebuilt here as Cartesian tensors (``xyz`` components).
"""

import logging
from typing import Any, Dict, List, Literal, Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)
from metatrain.utils.abc import ModelInterface
from metatrain.utils.data import DatasetInfo
from metatrain.utils.hypers import init_with_defaults, raise_if_hypers_mismatch
from metatrain.utils.metadata import merge_metadata

from ..long_range import LONG_RANGE_DEFAULTS
from ..model import SOAP_DEFAULT_HYPERS, SymatomicModel
from ..train.checkpoint import (
    CHECKPOINT_VERSION,
    upgrade_checkpoint,
    upgrade_model_hypers,
)
from .convert import spec_from_target_info
from .documentation import ModelHypers

__all__ = ["ARCHITECTURE_NAME", "SymatomicMTT"]

LOGGER = logging.getLogger(__name__)

#: the name under which :func:`symatomic.mtt.register` makes the architecture known
#: to metatrain (and which is stored in checkpoints)
ARCHITECTURE_NAME = "experimental.symatomic"


class SymatomicMTT(ModelInterface[ModelHypers]):
    """symatomic's PET (optionally with exact O(3) symmetrization) for metatrain.

    :param hypers: model hyper-parameters (:class:`~.documentation.ModelHypers`)
    :param dataset_info: length unit, atomic types and targets; targets must be
        ``energy`` or ``<domain>::<name>`` with ``sample_kind`` ``system`` or
        ``atom``
    """

    #: 1: PET hyper-parameters and ``ecse``; 2: also ``backbone``, ``tensor_heads``,
    #: ``basis_hidden`` and ``soap`` (scalar-basis tensor heads, SOAP backbone);
    #: 3: the hyper-parameters of the built model, ``auto`` choices resolved;
    #: 4: ``edge_inputs`` and ``density_*`` (invariant edge inputs of PET)
    __checkpoint_version__ = 9
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float32, torch.float64]
    __default_metadata__ = ModelMetadata(
        references={
            "architecture": [
                "https://arxiv.org/abs/2305.19302",
                "https://doi.org/10.1063/5.0251431",
            ],
            "implementation": ["https://github.com/symatomic/symatomic"],
        }
    )

    _layout_keys: Dict[str, Labels]
    _layout_components: Dict[str, List[List[Labels]]]
    _layout_properties: Dict[str, List[Labels]]
    _is_cartesian: Dict[str, bool]
    _cartesian_rank: Dict[str, int]
    _cartesian_bases: Dict[str, List[torch.Tensor]]

    def __init__(self, hypers: ModelHypers, dataset_info: DatasetInfo) -> None:
        super().__init__(hypers, dataset_info, self.__default_metadata__)
        if len(dataset_info.extra_data) > 0:
            raise ValueError(
                "symatomic models take no extra data; got "
                f"{sorted(dataset_info.extra_data)}"
            )
        specs = {
            name: spec_from_target_info(name, info)
            for name, info in dataset_info.targets.items()
        }
        self.model = SymatomicModel(
            dict(hypers), dataset_info.atomic_types, specs, dataset_info.length_unit
        )
        self.atomic_types: List[int] = list(self.model.atomic_types)
        #: targets whose baselines and scales were fitted on training data
        self.fitted_targets: List[str] = []
        self.outputs: Dict[str, ModelOutput] = {}
        self._layout_keys = {}
        self._layout_components = {}
        self._layout_properties = {}
        self._is_cartesian = {}
        self._cartesian_rank = {}
        self._cartesian_bases = {}
        self._set_layouts(dataset_info)
        # metatomic's standard feature output, invariant for exact models
        self.outputs["feature"] = ModelOutput(
            unit="",
            sample_kind="atom",
            description="the backbone's last atom features and their pooled pair "
            "features",
        )

    def _set_layouts(self, dataset_info: DatasetInfo) -> None:
        """Record the outputs and metatrain's layout of every target."""
        for name, info in dataset_info.targets.items():
            spec = self.model.target_specs[name]
            self.outputs[name] = ModelOutput(
                unit=info.unit, sample_kind="atom", description=info.description
            )
            layout = info.layout
            self._layout_keys[name] = layout.keys
            self._layout_components[name] = [b.components for b in layout.blocks()]
            self._layout_properties[name] = [b.properties for b in layout.blocks()]
            self._is_cartesian[name] = spec.kind == "cartesian"
            if spec.kind == "cartesian":
                self._cartesian_rank[name] = spec.rank
                self._cartesian_bases[name] = [
                    torch.tensor(block.basis, dtype=torch.float64)
                    for block in spec.decomposition().blocks
                ]

    # ---------------------------------------------------------------- interface
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        """The full neighbor list within the cutoff."""
        return self.model.requested_neighbor_lists()

    def supported_outputs(self) -> Dict[str, ModelOutput]:
        return self.outputs

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        """Evaluate the requested targets, in metatrain's layouts.

        :param systems: the structures (with the neighbor list of
            :meth:`requested_neighbor_lists`)
        :param outputs: target name → requested output; ``sample_kind="atom"``
            gives per-atom contributions, ``"system"`` their sums
        :param selected_atoms: ``(system, atom)`` pairs to include (default: all)
        """
        if len(outputs) == 0:
            return {}
        raw = self.model(systems, outputs, selected_atoms)
        result: Dict[str, TensorMap] = {}
        for name, tensor in raw.items():
            if name not in self._layout_keys:
                # feature, uncertainties, ensembles and last-layer features: in
                # symatomic's spherical layout (one uncertainty per (λ, σ) block)
                result[name] = tensor
            else:
                result[name] = self._to_layout(name, tensor)
        return result

    def _to_layout(self, name: str, tensor: TensorMap) -> TensorMap:
        """Give ``tensor`` (symatomic's output of target ``name``) the metadata of
        metatrain's layout; Cartesian targets ``(n, 3, …, 3, p)`` are rebuilt from
        their spherical blocks."""
        device = tensor.device
        keys = self._layout_keys[name].to(device)
        components = self._layout_components[name]
        properties = self._layout_properties[name]
        if self._is_cartesian[name]:
            bases = self._cartesian_bases[name]
            first = tensor.block(0)
            n_samples = first.values.shape[0]
            total = torch.zeros(0)
            for index, basis in enumerate(bases):
                values = tensor.block(index).values
                basis = basis.to(dtype=values.dtype, device=device)
                # (n, 2λ+1, multiplicity * p) → (n, 2λ+1, multiplicity, p)
                split = values.reshape(n_samples, basis.shape[1], basis.shape[2], -1)
                term = torch.einsum("nmkp,cmk->ncp", split, basis)
                total = term if index == 0 else total + term
            shape = [n_samples] + [3] * self._cartesian_rank[name]
            shape.append(total.shape[-1])
            block = TensorBlock(
                values=total.reshape(shape),
                samples=first.samples,
                components=[c.to(device) for c in components[0]],
                properties=properties[0].to(device),
            )
            return TensorMap(keys, [block])
        blocks: List[TensorBlock] = []
        for index in range(len(components)):
            block = tensor.block(index)
            blocks.append(
                TensorBlock(
                    values=block.values,
                    samples=block.samples,
                    components=[c.to(device) for c in components[index]],
                    properties=properties[index].to(device),
                )
            )
        return TensorMap(keys, blocks)

    def restart(
        self, dataset_info: DatasetInfo, model_hypers: Optional[Dict[str, Any]] = None
    ) -> "SymatomicMTT":
        """Prepare this model to train on ``dataset_info`` (restart or fine-tune).

        The hyper-parameters must be those of the model; new targets get new heads
        (the backbone and the other heads are kept); new atomic types are errors.
        """
        if model_hypers is not None:
            raise_if_hypers_mismatch(
                self.hypers,
                model_hypers,
                default_hypers=init_with_defaults(ModelHypers),
            )
        new_types = sorted(set(dataset_info.atomic_types) - set(self.atomic_types))
        if new_types:
            raise ValueError(
                f"the data contains atomic types {new_types} that this model does not "
                f"know (it knows {self.atomic_types}); symatomic models cannot add "
                "atomic types"
            )
        merged = self.dataset_info.union(dataset_info)
        specs = {
            name: spec_from_target_info(name, info)
            for name, info in merged.targets.items()
        }
        if set(specs) != set(self.model.target_specs):
            parameter = next(self.model.parameters())
            model = SymatomicModel(
                self.model.hypers,
                self.atomic_types,
                specs,
                self.dataset_info.length_unit,
            ).to(dtype=parameter.dtype, device=parameter.device)
            unexpected = model.load_state_dict(
                self.model.state_dict(), strict=False
            ).unexpected_keys
            if unexpected:  # pragma: no cover - targets are never removed
                raise ValueError(f"restart: unexpected weights {unexpected}")
            self.model = model
            LOGGER.info(
                "new heads for target(s) %s",
                sorted(set(specs) - set(self.dataset_info.targets)),
            )
        else:
            # same blocks; forces and stress follow the new data
            self.model.target_specs.update(specs)
        self._set_layouts(merged)
        self.dataset_info = merged
        return self

    # -------------------------------------------------------------- checkpoints
    def get_checkpoint(self) -> Dict[str, Any]:
        state = self.state_dict()
        return {
            "architecture_name": ARCHITECTURE_NAME,
            "model_ckpt_version": self.__checkpoint_version__,
            "symatomic_checkpoint_version": CHECKPOINT_VERSION,
            "metadata": self.metadata,
            "model_data": {
                # the built model's: ``auto`` choices resolved for its targets
                "model_hypers": self.model.hypers,
                "dataset_info": self.dataset_info,
                "fitted_targets": list(self.fitted_targets),
            },
            "epoch": None,
            "best_epoch": None,
            "model_state_dict": state,
            "best_model_state_dict": state,
        }

    @classmethod
    def load_checkpoint(
        cls,
        checkpoint: Dict[str, Any],
        context: Literal["restart", "finetune", "export"],
    ) -> "SymatomicMTT":
        if context == "restart":
            LOGGER.info(f"Using latest model from epoch {checkpoint['epoch']}")
            state = checkpoint["model_state_dict"]
        elif context in ("finetune", "export"):
            LOGGER.info(f"Using best model from epoch {checkpoint['best_epoch']}")
            state = checkpoint.get("best_model_state_dict")
            if state is None:
                state = checkpoint["model_state_dict"]
        else:
            raise ValueError(
                f"unknown context '{context}' to load a checkpoint (expected "
                "'restart', 'finetune' or 'export')"
            )
        # weights written by an older symatomic
        inner = upgrade_checkpoint(
            {
                "version": checkpoint.get("symatomic_checkpoint_version", 2),
                "model_state_dict": state,
            },
            "(metatrain checkpoint)",
        )
        state = inner["model_state_dict"]
        model_data = checkpoint["model_data"]
        model = cls(model_data["model_hypers"], model_data["dataset_info"])
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        model.to(dtype)
        model.load_state_dict(state)
        model.fitted_targets = list(model_data.get("fitted_targets", []))
        model.metadata = merge_metadata(model.metadata, checkpoint.get("metadata"))
        return model

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        version = checkpoint.get("model_ckpt_version")
        if version in (1, 2):
            # version 2 added the backbone and tensor-head options (version 1
            # models are PET with direct heads); version 3 stores the resolved
            # hyper-parameters of the built model (the defaults became ``auto``)
            checkpoint = dict(checkpoint)
            model_data = dict(checkpoint["model_data"])
            hypers = upgrade_model_hypers(model_data["model_hypers"])
            hypers.setdefault("soap", dict(SOAP_DEFAULT_HYPERS))
            model_data["model_hypers"] = hypers
            checkpoint["model_data"] = model_data
            checkpoint["model_ckpt_version"] = version = 3
        if version == 3:
            # version 4 added PET's invariant edge inputs: older models have
            # Cartesian ones
            checkpoint = dict(checkpoint)
            model_data = dict(checkpoint["model_data"])
            hypers = upgrade_model_hypers(model_data["model_hypers"])
            hypers.setdefault("soap", dict(SOAP_DEFAULT_HYPERS))
            model_data["model_hypers"] = hypers
            checkpoint["model_data"] = model_data
            checkpoint["model_ckpt_version"] = version = 4
        if version == 4:
            # version 5 added the (calibrated) last-layer uncertainties of every
            # read-out: older models load them unfitted (BlockUncertainty's hook)
            checkpoint = dict(checkpoint)
            checkpoint["model_ckpt_version"] = version = 5
        if version == 5:
            # version 6 added the long-range options: older models are local
            checkpoint = dict(checkpoint)
            model_data = dict(checkpoint["model_data"])
            hypers = dict(model_data["model_hypers"])
            hypers.setdefault("long_range", dict(LONG_RANGE_DEFAULTS))
            model_data["model_hypers"] = hypers
            checkpoint["model_data"] = model_data
            checkpoint["model_ckpt_version"] = version = 6
        if version == 6:
            # version 7 divides the heads' pair sums by the average number of
            # neighbors: the weights of older models get pair_normalization 1 when
            # they are loaded (symatomic's checkpoint version 5 step)
            checkpoint = dict(checkpoint)
            checkpoint["model_ckpt_version"] = version = 7
        if version == 7:
            # version 8 stores a factor of the uncertainties' inverse covariance
            # (covariance_root): BlockUncertainty's hook converts older ones
            checkpoint = dict(checkpoint)
            checkpoint["model_ckpt_version"] = version = 8
        if version == 8:
            # version 9 made PET's reverse_last_layer an option, off by default:
            # older models combined the last layer's tokens with their reverses
            checkpoint = dict(checkpoint)
            model_data = dict(checkpoint["model_data"])
            hypers = dict(model_data["model_hypers"])
            hypers.setdefault("reverse_last_layer", True)
            model_data["model_hypers"] = hypers
            checkpoint["model_data"] = model_data
            checkpoint["model_ckpt_version"] = version = 9
        if version != cls.__checkpoint_version__:
            raise RuntimeError(
                "Unable to upgrade the checkpoint: the checkpoint is using model "
                f"version {version}, while the current model version is "
                f"{cls.__checkpoint_version__}."
            )
        return checkpoint

    # ------------------------------------------------------------------- export
    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        """This model as a metatomic :class:`AtomisticModel` (outputs in metatrain's
        layouts; Cartesian targets as Cartesian tensors)."""
        dtype = next(self.parameters()).dtype
        if dtype not in self.__supported_dtypes__:
            raise ValueError(f"unsupported dtype {dtype} for export")
        # the targets in metatrain's layouts, and what the inner model adds once
        # calibrated: uncertainties, ensembles, last-layer features
        outputs = dict(self.outputs)
        for name, output in self.model.capabilities().outputs.items():
            if name not in outputs:
                outputs[name] = output
        capabilities = ModelCapabilities(
            outputs=outputs,
            atomic_types=self.atomic_types,
            interaction_range=self.model.interaction_range,
            length_unit=self.dataset_info.length_unit,
            supported_devices=self.__supported_devices__,
            dtype="float64" if dtype == torch.float64 else "float32",
        )
        model = self.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return AtomisticModel(
            model, merge_metadata(self.metadata, metadata), capabilities
        )
